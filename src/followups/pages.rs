//! The small German pages of the public unsubscribe endpoints (`GET`/`POST /unsubscribe`).
//!
//! `GET` only shows [`confirm`]: mail scanners and link previews open links on their own, so the
//! consent is withdrawn only by the form's `POST`. The pages carry no script and no inline style —
//! the service's Content-Security-Policy (`script-src 'self'`) would block an inline script anyway
//! — and take their look from `/assets/app.css`. Every inserted value is HTML-escaped.

use super::templates::escape_html;
use super::token::TokenError;

/// Why an unsubscribe link cannot be used. Whatever the reason, nothing was changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidReason {
    /// The token's signature is valid but its time is up.
    Expired,
    /// The token is malformed or its signature does not match.
    Tampered,
    /// The token is genuine but names a link or lead we do not know (any more).
    Unknown,
}

impl From<TokenError> for InvalidReason {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Expired => InvalidReason::Expired,
            TokenError::Malformed | TokenError::BadSignature => InvalidReason::Tampered,
        }
    }
}

/// A full page around `content` (already HTML).
fn page(title: &str, content: &str) -> String {
    format!(
        "<!DOCTYPE html>\n\
         <html lang=\"de\">\n\
         <head>\n\
         <meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"robots\" content=\"noindex, nofollow\">\n\
         <meta name=\"referrer\" content=\"no-referrer\">\n\
         <title>{title} – FreshFoodz</title>\n\
         <link rel=\"stylesheet\" href=\"/assets/app.css\">\n\
         </head>\n\
         <body>\n\
         <main class=\"page\">\n\
         <section class=\"card login-panel\">\n\
         <h2>{title}</h2>\n\
         {content}\
         </section>\n\
         </main>\n\
         </body>\n\
         </html>\n",
        title = escape_html(title),
    )
}

/// Asks whether to unsubscribe; the form posts `token` to `/unsubscribe`.
pub fn confirm(company_name: &str, token: &str) -> String {
    page(
        "E-Mail-Abmeldung",
        &format!(
            "<p>Möchten Sie sich von E-Mails von FreshFoodz für <strong>{company}</strong> \
             abmelden?</p>\n\
             <p>Nach der Abmeldung senden wir Ihnen keine weiteren Follow-up- und Angebots-E-Mails \
             mehr.</p>\n\
             <form method=\"post\" action=\"/unsubscribe\">\n\
             <input type=\"hidden\" name=\"token\" value=\"{token}\">\n\
             <button type=\"submit\" class=\"btn btn-primary\">Abmelden</button>\n\
             </form>\n",
            company = escape_html(company_name),
            token = escape_html(token),
        ),
    )
}

/// The consent was withdrawn.
pub fn done(company_name: &str) -> String {
    page(
        "Sie wurden abgemeldet",
        &format!(
            "<p>Ihre Einwilligung zum Empfang von E-Mails von FreshFoodz für \
             <strong>{company}</strong> ist widerrufen. Sie erhalten von uns keine weiteren \
             Follow-up- und Angebots-E-Mails mehr.</p>\n\
             <p>Falls Sie sich versehentlich abgemeldet haben, wenden Sie sich bitte an Ihren \
             Kontakt bei FreshFoodz.</p>\n",
            company = escape_html(company_name),
        ),
    )
}

/// The link was used before: nothing changed.
pub fn already(company_name: &str) -> String {
    page(
        "Bereits abgemeldet",
        &format!(
            "<p>Dieser Abmeldelink wurde bereits verwendet. Die Abmeldung für \
             <strong>{company}</strong> ist schon erfolgt; es wurde nichts geändert.</p>\n",
            company = escape_html(company_name),
        ),
    )
}

/// The link cannot be used: nothing changed.
pub fn invalid(reason: InvalidReason) -> String {
    let (title, text) = match reason {
        InvalidReason::Expired => (
            "Der Link ist abgelaufen",
            "Dieser Abmeldelink ist nicht mehr gültig. Es wurde nichts geändert. Bitte verwenden \
             Sie den Link aus einer neueren E-Mail von FreshFoodz oder antworten Sie einfach auf \
             eine unserer E-Mails.",
        ),
        InvalidReason::Tampered => (
            "Der Link ist ungültig",
            "Dieser Abmeldelink ist unvollständig oder wurde verändert. Es wurde nichts geändert. \
             Bitte öffnen Sie den Link direkt aus der E-Mail oder kopieren Sie ihn vollständig.",
        ),
        InvalidReason::Unknown => (
            "Der Link ist ungültig",
            "Dieser Abmeldelink ist uns nicht bekannt. Es wurde nichts geändert. Bitte \
             antworten Sie auf eine unserer E-Mails, wenn Sie keine weiteren Nachrichten \
             erhalten möchten.",
        ),
    };
    page(title, &format!("<p>{}</p>\n", escape_html(text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOSTILE: &str = "<script>alert(1)</script> & \"Söhne\" 'x'";
    const HOSTILE_ESCAPED: &str =
        "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;Söhne&quot; &#39;x&#39;";

    fn all_pages() -> Vec<String> {
        vec![
            confirm("Restaurant Sonne GmbH", "abc.def"),
            done("Restaurant Sonne GmbH"),
            already("Restaurant Sonne GmbH"),
            invalid(InvalidReason::Expired),
            invalid(InvalidReason::Tampered),
            invalid(InvalidReason::Unknown),
        ]
    }

    #[test]
    fn every_page_is_a_german_utf8_document_without_scripts_or_inline_styles() {
        for p in all_pages() {
            assert!(p.starts_with("<!DOCTYPE html>\n<html lang=\"de\">"), "{p}");
            assert!(p.contains("<meta charset=\"utf-8\">"));
            assert!(p.contains("<link rel=\"stylesheet\" href=\"/assets/app.css\">"));
            assert!(p.trim_end().ends_with("</html>"));
            let lower = p.to_lowercase();
            for bad in [
                "<script",
                "<style",
                "style=",
                "onclick",
                "onload",
                "onerror",
                "onsubmit",
                "javascript:",
            ] {
                assert!(!lower.contains(bad), "page contains {bad}: {p}");
            }
        }
    }

    #[test]
    fn the_confirmation_form_posts_the_token_to_unsubscribe() {
        let token = "AQEjRWeJq83vASNFZ4mrze_-3LqYdlQy.q83vASNFZ4mrze-_";
        let p = confirm("Restaurant Sonne GmbH", token);
        assert!(p.contains("<form method=\"post\" action=\"/unsubscribe\">"));
        assert!(p.contains(&format!(
            "<input type=\"hidden\" name=\"token\" value=\"{token}\">"
        )));
        assert!(p.contains(">Abmelden</button>"));
        assert!(p.contains(
            "Möchten Sie sich von E-Mails von FreshFoodz für <strong>Restaurant Sonne GmbH</strong> abmelden?"
        ));
        // the form sits inside the document, and only one of it
        assert_eq!(p.matches("<form").count(), 1);
        assert!(p.find("<form").expect("form") < p.find("</form>").expect("form end"));
    }

    #[test]
    fn company_names_and_tokens_are_escaped_on_every_page() {
        for p in [confirm(HOSTILE, "t"), done(HOSTILE), already(HOSTILE)] {
            assert!(p.contains(HOSTILE_ESCAPED), "{p}");
            assert!(!p.contains("<script"), "{p}");
        }
        let p = confirm("Firma", "x\"><script>alert(1)</script>");
        assert!(p.contains("value=\"x&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;\""));
        assert!(!p.contains("<script"));
    }

    #[test]
    fn the_invalid_page_says_why_and_that_nothing_changed() {
        let expired = invalid(InvalidReason::Expired);
        assert!(expired.contains("Der Link ist abgelaufen"));
        for reason in [InvalidReason::Tampered, InvalidReason::Unknown] {
            assert!(invalid(reason).contains("ungültig"), "{reason:?}");
        }
        for reason in [
            InvalidReason::Expired,
            InvalidReason::Tampered,
            InvalidReason::Unknown,
        ] {
            assert!(invalid(reason).contains("Es wurde nichts geändert."));
            assert!(!invalid(reason).contains("<form"));
        }
        assert!(already("Firma").contains("es wurde nichts geändert"));
        assert!(done("Firma").contains("widerrufen"));
    }

    #[test]
    fn token_errors_map_to_the_invalid_reasons() {
        assert_eq!(
            InvalidReason::from(TokenError::Expired),
            InvalidReason::Expired
        );
        assert_eq!(
            InvalidReason::from(TokenError::Malformed),
            InvalidReason::Tampered
        );
        assert_eq!(
            InvalidReason::from(TokenError::BadSignature),
            InvalidReason::Tampered
        );
    }
}
