//! The two German follow-up mails (T+3 sample follow-up, T+7 bulk order), rendered as pure
//! functions of their input: no database, no clock, no I/O, so the job can render, retry and test
//! them freely and the same input always gives the same mail.
//!
//! A mail is first built as a small list of plain-text blocks; the text/plain part joins them and
//! the HTML part escapes every block before wrapping it in markup. Values from outside (company,
//! contact person, sender, unsubscribe link) therefore cannot inject markup into the HTML, and the
//! text part carries them verbatim. Control characters (CR, LF, …) in those values become spaces so
//! a value cannot start a new line in the subject or fake a paragraph.
//!
//! Swiss Standard German has no "ß": the template sentences (never the inserted values) are
//! written with "ss" for CH.

use chrono::{Datelike, NaiveDate};

use crate::leads::domain::BusinessType;
use crate::territory::Territory;

/// Which follow-up a mail is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Three days after registration: the Cook&Fresh starter box.
    T3,
    /// Seven days after registration: bulk-order discount.
    T7,
}

impl Kind {
    /// Every kind, in order.
    pub const ALL: &'static [Kind] = &[Kind::T3, Kind::T7];

    /// The wire spelling ("T3", "T7").
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::T3 => "T3",
            Kind::T7 => "T7",
        }
    }

    /// The metric label value ("t3", "t7").
    pub fn metric_label(self) -> &'static str {
        match self {
            Kind::T3 => "t3",
            Kind::T7 => "t7",
        }
    }

    /// Parses the wire spelling.
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "T3" => Some(Kind::T3),
            "T7" => Some(Kind::T7),
            _ => None,
        }
    }
}

/// Meteorological season, which picks the seasonal suggestion of the T+3 mail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Season {
    Spring,
    Summer,
    Autumn,
    Winter,
}

impl Season {
    /// Every season, in order.
    pub const ALL: &'static [Season] = &[
        Season::Spring,
        Season::Summer,
        Season::Autumn,
        Season::Winter,
    ];

    /// The spelling used in template ids ("SPRING", …).
    pub fn as_str(self) -> &'static str {
        match self {
            Season::Spring => "SPRING",
            Season::Summer => "SUMMER",
            Season::Autumn => "AUTUMN",
            Season::Winter => "WINTER",
        }
    }
}

/// The season of a date: March–May spring, June–August summer, September–November autumn,
/// December–February winter.
pub fn season(date: NaiveDate) -> Season {
    match date.month() {
        3..=5 => Season::Spring,
        6..=8 => Season::Summer,
        9..=11 => Season::Autumn,
        _ => Season::Winter,
    }
}

/// Bulk-order terms by business type: (discount in percent, minimum order value in EUR).
pub fn bulk_terms(bt: BusinessType) -> (u32, u32) {
    match bt {
        BusinessType::Restaurant => (15, 500),
        BusinessType::Hotel => (20, 1000),
        BusinessType::Kantine => (25, 2000),
        BusinessType::Catering => (10, 300),
        BusinessType::Grosshandel
        | BusinessType::Leh
        | BusinessType::Bildung
        | BusinessType::Gesundheit
        | BusinessType::Sonstiges => (10, 250),
    }
}

/// Everything a follow-up mail is made of.
#[derive(Debug, Clone)]
pub struct MailInput<'a> {
    pub kind: Kind,
    pub business_type: BusinessType,
    pub territory: Territory,
    pub company_name: &'a str,
    /// Used in the salutation; `None` or blank gives "Guten Tag,".
    pub contact_person: Option<&'a str>,
    /// The lead owner's display name, signs the mail.
    pub sender_name: &'a str,
    /// The Berlin date of sending; picks the season.
    pub date: NaiveDate,
    pub unsubscribe_url: &'a str,
}

/// A rendered mail, ready for the dispatcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedMail {
    /// Deterministic template id: `T3/<BUSINESS_TYPE>/<SEASON>` or `T7/<BUSINESS_TYPE>`.
    pub template: String,
    /// One line, no control characters.
    pub subject: String,
    /// The text/plain body (UTF-8, `\n` line ends).
    pub text: String,
    /// The text/html body: a full, self-contained document (inline styles only).
    pub html: String,
}

pub use crate::html::escape_html;

/// A value from outside on one line: control characters become spaces, ends trimmed.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

/// Template wording for the territory (CH writes "ss" for "ß"). Apply before inserting values.
fn localise(territory: Territory, s: &str) -> String {
    match territory {
        Territory::CH => s.replace('ß', "ss"),
        Territory::DE | Territory::AT => s.to_string(),
    }
}

/// German thousands grouping: 1000 → "1.000".
fn group_thousands(n: u32) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push('.');
        }
        out.push(c);
    }
    out
}

/// "1.000 €".
fn euros(n: u32) -> String {
    format!("{} €", group_thousands(n))
}

/// "15 %".
fn percent(n: u32) -> String {
    format!("{n} %")
}

/// The T+3 suggestion by business type.
fn type_suggestion(bt: BusinessType) -> &'static str {
    match bt {
        BusinessType::Restaurant => {
            "Für Ihren Mittagstisch und Ihre À-la-carte-Küche eignen sich unsere vorbereiteten \
             Komponenten besonders: gleichbleibende Qualität, auch wenn es in der Stoßzeit schnell \
             gehen muss."
        }
        BusinessType::Hotel => {
            "Für Ihr Frühstücksbuffet und Ihre Bankette bietet Cook&Fresh Produkte, die sich gut \
             vorbereiten und auch für viele Gäste frisch servieren lassen."
        }
        BusinessType::Kantine => {
            "Für die Gemeinschaftsverpflegung großer Mengen gibt es Cook&Fresh in \
             Großküchengebinden, die Ihre Abläufe planbar machen und Ihr Team entlasten."
        }
        BusinessType::Catering => {
            "Für Ihre Events und Veranstaltungen enthält die Box Buffet- und Fingerfood-Komponenten, \
             die sich gut transportieren und vor Ort schnell anrichten lassen."
        }
        BusinessType::Bildung => {
            "Für die Schul- und Mensaverpflegung finden Sie ausgewogene, kindgerechte Gerichte, die \
             sich zuverlässig in großen Mengen zubereiten lassen."
        }
        BusinessType::Gesundheit => {
            "Für die Verpflegung in Klinik und Pflege enthält die Box ausgewogene \
             Menükomponenten, die sich auch für besondere Kostformen gut anpassen lassen."
        }
        BusinessType::Leh => {
            "Für Ihr Sortiment zeigt die Box, welche Cook&Fresh Produkte sich als frische Ergänzung \
             in Ihrem Markt bewähren."
        }
        BusinessType::Grosshandel => {
            "Für Ihr Sortiment zeigt die Box, welche Cook&Fresh Produkte sich für Ihre Kundschaft \
             aus Gastronomie und Gemeinschaftsverpflegung eignen."
        }
        BusinessType::Sonstiges => {
            "Die Box gibt Ihnen einen Querschnitt durch unser Sortiment – gern stellen wir sie \
             passend zu Ihrem Betrieb zusammen."
        }
    }
}

/// The T+3 suggestion by season.
fn season_suggestion(s: Season) -> &'static str {
    match s {
        Season::Spring => {
            "Passend zur Saison: Die Spargelzeit beginnt – wir legen Ihnen Ideen rund um Spargel \
             und frische Frühlingskräuter bei."
        }
        Season::Summer => {
            "Passend zur Saison: Zur Grill- und Salatsaison empfehlen wir knackige Salate, \
             Grillgemüse und frische Beeren."
        }
        Season::Autumn => {
            "Passend zur Saison: Vom Oktoberfest bis zur Kürbiszeit – wir zeigen Ihnen herbstliche \
             Klassiker rund um Kürbis, Pilze und Schmorgerichte."
        }
        Season::Winter => {
            "Passend zur Saison: Für Ihre Weihnachtsmenüs haben wir Anregungen vom Gänsebraten bis \
             zu festlichen Beilagen."
        }
    }
}

/// "Für Ihr Restaurant" … for the T+7 terms sentence.
fn for_your_business(bt: BusinessType) -> &'static str {
    match bt {
        BusinessType::Restaurant => "Für Ihr Restaurant",
        BusinessType::Hotel => "Für Ihr Hotel",
        BusinessType::Kantine => "Für Ihre Kantine",
        BusinessType::Catering => "Für Ihr Cateringunternehmen",
        BusinessType::Grosshandel => "Für Ihr Großhandelsunternehmen",
        BusinessType::Leh => "Für Ihren Markt",
        BusinessType::Bildung => "Für Ihre Bildungseinrichtung",
        BusinessType::Gesundheit => "Für Ihre Einrichtung",
        BusinessType::Sonstiges => "Für Ihren Betrieb",
    }
}

/// The legal footer (Impressum) of the sending company per territory, one line per entry.
///
/// The registration data are made-up examples in the correct format; replace them with the
/// companies' real data before going live.
fn legal_footer(territory: Territory) -> &'static [&'static str] {
    match territory {
        Territory::DE => &[
            "FreshFoodz GmbH · Beispielstraße 1 · 10115 Berlin · Deutschland",
            "Sitz der Gesellschaft: Berlin · Registergericht: Amtsgericht Charlottenburg, \
             HRB 123456 B",
            "USt-IdNr.: DE123456789",
        ],
        Territory::AT => &[
            "FreshFoodz Austria GmbH · Beispielgasse 1 · 1010 Wien · Österreich",
            "Sitz: Wien · Firmenbuchgericht: Handelsgericht Wien · Firmenbuchnummer: FN 123456 a",
            "UID: ATU12345678",
        ],
        Territory::CH => &[
            "FreshFoodz Schweiz AG · Beispielstrasse 1 · 8001 Zürich · Schweiz",
            "Sitz: Zürich · Handelsregister des Kantons Zürich",
            "UID: CHE-123.456.789 MWST",
        ],
    }
}

/// A piece of the mail body.
enum Block {
    Para(String),
    /// Label and value, e.g. "Mengenrabatt" / "15 %".
    Terms(Vec<(String, String)>),
    /// Closing line, then signature lines.
    Signature(String, Vec<String>),
}

struct Parts {
    template: String,
    subject: String,
    preheader: String,
    body: Vec<Block>,
}

fn compose(input: &MailInput) -> Parts {
    let t = |s: &str| localise(input.territory, s);
    let company = one_line(input.company_name);
    let sender = one_line(input.sender_name);
    let contact = input.contact_person.map(one_line).unwrap_or_default();
    let salutation = if contact.is_empty() {
        "Guten Tag,".to_string()
    } else {
        format!("Guten Tag {contact},")
    };
    let signature = Block::Signature(
        t("Mit freundlichen Grüßen"),
        vec![sender, t("Ihr FreshFoodz-Vertriebsteam")],
    );
    let bt = input.business_type;
    match input.kind {
        Kind::T3 => {
            let season = season(input.date);
            Parts {
                template: format!("T3/{}/{}", bt.as_str(), season.as_str()),
                subject: format!("Ihre Cook&Fresh Probierbox für {company}"),
                preheader: t("Entdecken Sie Cook&Fresh mit unserer Probierbox."),
                body: vec![
                    Block::Para(salutation),
                    Block::Para(format!(
                        "{} {company} {}",
                        t("vielen Dank für Ihr Interesse an FreshFoodz und für das Gespräch bzw. \
                           Ihre Registrierung – wir freuen uns darauf,"),
                        t("kennenzulernen."),
                    )),
                    Block::Para(t(
                        "Damit Sie sich selbst von der Qualität überzeugen können, stellen wir \
                         Ihnen gern unsere Cook&Fresh Probierbox zusammen: eine Auswahl unserer \
                         beliebtesten Frischeprodukte zum Kennenlernen.",
                    )),
                    Block::Para(t(type_suggestion(bt))),
                    Block::Para(t(season_suggestion(season))),
                    Block::Para(t(
                        "Antworten Sie einfach auf diese E-Mail und nennen Sie uns Ihren \
                         Wunschtermin – wir kümmern uns um den Rest.",
                    )),
                    signature,
                ],
            }
        }
        Kind::T7 => {
            let (discount, minimum) = bulk_terms(bt);
            Parts {
                template: format!("T7/{}", bt.as_str()),
                subject: format!(
                    "{company}: {} {}",
                    percent(discount),
                    t("Mengenrabatt auf Ihre Cook&Fresh Großbestellung")
                ),
                preheader: format!(
                    "{} {} {}",
                    percent(discount),
                    t("Rabatt ab"),
                    euros(minimum)
                ),
                body: vec![
                    Block::Para(salutation),
                    Block::Para(format!(
                        "{} {company} {}",
                        t(
                            "vor einigen Tagen haben wir Ihnen unsere Cook&Fresh Probierbox \
                           vorgestellt. Wenn Sie Cook&Fresh bei"
                        ),
                        t("regelmäßig einsetzen möchten, lohnt sich eine Großbestellung."),
                    )),
                    Block::Para(format!(
                        "{} {}",
                        t(for_your_business(bt)),
                        t("gelten folgende Konditionen:")
                    )),
                    Block::Terms(vec![
                        (t("Mengenrabatt"), percent(discount)),
                        (t("Mindestbestellwert"), euros(minimum)),
                    ]),
                    Block::Para(format!(
                        "{} {} {} {} {}",
                        t("Bei einer Bestellung ab"),
                        euros(minimum),
                        t("Warenwert erhalten Sie"),
                        percent(discount),
                        t("Rabatt auf die gesamte Bestellung."),
                    )),
                    Block::Para(t(
                        "Antworten Sie einfach auf diese E-Mail – ich stelle Ihnen gern ein \
                         individuelles Angebot zusammen.",
                    )),
                    signature,
                ],
            }
        }
    }
}

fn consent_note(territory: Territory) -> String {
    localise(
        territory,
        "Sie erhalten diese E-Mail, weil Sie dem Empfang von Informationen von FreshFoodz \
         zugestimmt haben.",
    )
}

const UNSUBSCRIBE_PROMPT: &str = "Sie möchten keine weiteren E-Mails erhalten? Hier abmelden:";

fn render_text(parts: &Parts, territory: Territory, unsubscribe_url: &str) -> String {
    let mut out = String::new();
    for block in &parts.body {
        match block {
            Block::Para(p) => out.push_str(p),
            Block::Terms(rows) => {
                for (i, (label, value)) in rows.iter().enumerate() {
                    if i > 0 {
                        out.push('\n');
                    }
                    out.push_str(&format!("- {label}: {value}"));
                }
            }
            Block::Signature(closing, lines) => {
                out.push_str(closing);
                for line in lines.iter().filter(|l| !l.is_empty()) {
                    out.push('\n');
                    out.push_str(line);
                }
            }
        }
        out.push_str("\n\n");
    }
    out.push_str("-- \n");
    for line in legal_footer(territory) {
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&consent_note(territory));
    out.push('\n');
    out.push_str(UNSUBSCRIBE_PROMPT);
    out.push(' ');
    out.push_str(unsubscribe_url);
    out.push('\n');
    out
}

// Mail clients ignore <style> blocks and external CSS unevenly; inline styles are the portable way.
const STYLE_BODY: &str = "margin:0;padding:0;background-color:#f4f6f4;";
const STYLE_WRAP: &str = "max-width:600px;margin:0 auto;padding:24px 16px;\
    font-family:Arial,Helvetica,sans-serif;font-size:15px;line-height:1.5;color:#17241d;";
const STYLE_CARD: &str = "background-color:#ffffff;border:1px solid #e1e7e3;border-radius:8px;\
    padding:24px;";
const STYLE_BRAND: &str = "margin:0 0 16px;font-size:18px;font-weight:bold;color:#1f6f43;";
const STYLE_P: &str = "margin:0 0 14px;";
const STYLE_TERMS: &str = "margin:0 0 14px;border-collapse:collapse;";
const STYLE_TERM_LABEL: &str = "padding:6px 16px 6px 0;color:#56665d;";
const STYLE_TERM_VALUE: &str = "padding:6px 0;font-weight:bold;font-size:17px;color:#1f6f43;";
const STYLE_FOOTER: &str = "margin:16px 0 0;font-size:12px;line-height:1.5;color:#56665d;";
const STYLE_LINK: &str = "color:#1f6f43;";
const STYLE_PREHEADER: &str = "display:none;max-height:0;overflow:hidden;";

fn render_html(parts: &Parts, territory: Territory, unsubscribe_url: &str) -> String {
    let lang = match territory {
        Territory::DE => "de-DE",
        Territory::AT => "de-AT",
        Territory::CH => "de-CH",
    };
    let mut body = String::new();
    for block in &parts.body {
        match block {
            Block::Para(p) => {
                body.push_str(&format!("<p style=\"{STYLE_P}\">{}</p>\n", escape_html(p)));
            }
            Block::Terms(rows) => {
                body.push_str(&format!(
                    "<table role=\"presentation\" style=\"{STYLE_TERMS}\">\n"
                ));
                for (label, value) in rows {
                    body.push_str(&format!(
                        "<tr><td style=\"{STYLE_TERM_LABEL}\">{}</td>\
                         <td style=\"{STYLE_TERM_VALUE}\">{}</td></tr>\n",
                        escape_html(label),
                        escape_html(value)
                    ));
                }
                body.push_str("</table>\n");
            }
            Block::Signature(closing, lines) => {
                let mut sig = escape_html(closing);
                for line in lines.iter().filter(|l| !l.is_empty()) {
                    sig.push_str("<br>");
                    sig.push_str(&escape_html(line));
                }
                body.push_str(&format!("<p style=\"{STYLE_P}\">{sig}</p>\n"));
            }
        }
    }
    let footer = legal_footer(territory)
        .iter()
        .map(|l| escape_html(l))
        .collect::<Vec<_>>()
        .join("<br>");
    let url = escape_html(unsubscribe_url);
    format!(
        "<!DOCTYPE html>\n\
         <html lang=\"{lang}\">\n\
         <head>\n\
         <meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n\
         </head>\n\
         <body style=\"{STYLE_BODY}\">\n\
         <div style=\"{STYLE_PREHEADER}\">{preheader}</div>\n\
         <div style=\"{STYLE_WRAP}\">\n\
         <div style=\"{STYLE_CARD}\">\n\
         <p style=\"{STYLE_BRAND}\">FreshFoodz · Cook&amp;Fresh</p>\n\
         {body}\
         </div>\n\
         <p style=\"{STYLE_FOOTER}\">{footer}</p>\n\
         <p style=\"{STYLE_FOOTER}\">{consent}<br>\n\
         {prompt} <a href=\"{url}\" style=\"{STYLE_LINK}\">{url}</a></p>\n\
         </div>\n\
         </body>\n\
         </html>\n",
        title = escape_html(&parts.subject),
        preheader = escape_html(&parts.preheader),
        consent = escape_html(&consent_note(territory)),
        prompt = escape_html(UNSUBSCRIBE_PROMPT),
    )
}

/// Renders the follow-up mail for `input`: same input, same mail.
pub fn render(input: &MailInput) -> RenderedMail {
    let parts = compose(input);
    // The link is ours, but keep it on one line like every other inserted value.
    let url = one_line(input.unsubscribe_url);
    RenderedMail {
        template: parts.template.clone(),
        subject: parts.subject.clone(),
        text: render_text(&parts, input.territory, &url),
        html: render_html(&parts, input.territory, &url),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "https://leads.freshfoodz.example/unsubscribe?token=abc.DEF-_123";

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).expect("valid test date")
    }

    fn input(
        kind: Kind,
        bt: BusinessType,
        territory: Territory,
        d: NaiveDate,
    ) -> MailInput<'static> {
        MailInput {
            kind,
            business_type: bt,
            territory,
            company_name: "Restaurant Sonne GmbH",
            contact_person: Some("Anna Müller"),
            sender_name: "Jonas Weber",
            date: d,
            unsubscribe_url: URL,
        }
    }

    const TERRITORIES: [Territory; 3] = [Territory::DE, Territory::AT, Territory::CH];

    fn a_date_in(s: Season) -> NaiveDate {
        match s {
            Season::Spring => date(2025, 4, 10),
            Season::Summer => date(2025, 7, 10),
            Season::Autumn => date(2025, 10, 10),
            Season::Winter => date(2025, 12, 10),
        }
    }

    fn footer_marker(t: Territory) -> [&'static str; 3] {
        match t {
            Territory::DE => ["FreshFoodz GmbH", "HRB 123456 B", "USt-IdNr.: DE123456789"],
            Territory::AT => ["FreshFoodz Austria GmbH", "FN 123456 a", "UID: ATU12345678"],
            Territory::CH => ["FreshFoodz Schweiz AG", "Zürich", "UID: CHE-123.456.789"],
        }
    }

    #[test]
    fn every_kind_business_type_season_and_territory_renders_filled_with_footer_and_unsubscribe_link(
    ) {
        for &kind in Kind::ALL {
            for &bt in BusinessType::ALL {
                for &s in Season::ALL {
                    for t in TERRITORIES {
                        let mail = render(&input(kind, bt, t, a_date_in(s)));
                        let what = format!("{} {:?} {:?}", mail.template, s, t);
                        for part in [&mail.subject, &mail.text, &mail.html] {
                            assert!(!part.contains('{') && !part.contains('}'), "{what}: {part}");
                            assert!(!part.trim().is_empty(), "{what}");
                        }
                        for marker in footer_marker(t) {
                            assert!(mail.text.contains(marker), "{what}: text lacks {marker}");
                            assert!(mail.html.contains(marker), "{what}: html lacks {marker}");
                        }
                        for other in TERRITORIES.iter().filter(|&&o| o != t) {
                            let foreign = footer_marker(*other)[2];
                            assert!(!mail.text.contains(foreign), "{what}: foreign footer");
                        }
                        assert!(mail.text.contains(&format!("{UNSUBSCRIBE_PROMPT} {URL}")));
                        assert!(mail.html.contains(&format!("<a href=\"{URL}\"")), "{what}");
                        assert!(mail.html.contains(UNSUBSCRIBE_PROMPT), "{what}");
                        assert!(mail.text.contains("Guten Tag Anna Müller,"), "{what}");
                        assert!(mail
                            .text
                            .contains("Jonas Weber\nIhr FreshFoodz-Vertriebsteam"));
                        assert!(!mail.subject.contains('\n'));
                    }
                }
            }
        }
    }

    #[test]
    fn the_html_part_is_a_self_contained_document_without_scripts_or_external_resources() {
        for &kind in Kind::ALL {
            let mail = render(&input(
                kind,
                BusinessType::Hotel,
                Territory::DE,
                date(2025, 1, 5),
            ));
            assert!(mail
                .html
                .starts_with("<!DOCTYPE html>\n<html lang=\"de-DE\">"));
            assert!(mail.html.contains("<meta charset=\"utf-8\">"));
            assert!(mail.html.trim_end().ends_with("</html>"));
            let lower = mail.html.to_lowercase();
            for bad in [
                "<script", "<link", "<img", "<iframe", "src=", "url(", "@import",
            ] {
                assert!(!lower.contains(bad), "{kind:?} html contains {bad}");
            }
            // the only link is the unsubscribe link
            assert_eq!(lower.matches("href=").count(), 1);
        }
    }

    #[test]
    fn t7_states_the_discount_and_minimum_order_of_the_business_type_in_german_format() {
        let cases = [
            (BusinessType::Restaurant, "15 %", "500 €"),
            (BusinessType::Hotel, "20 %", "1.000 €"),
            (BusinessType::Kantine, "25 %", "2.000 €"),
            (BusinessType::Catering, "10 %", "300 €"),
            (BusinessType::Leh, "10 %", "250 €"),
            (BusinessType::Sonstiges, "10 %", "250 €"),
        ];
        for (bt, pct, min) in cases {
            let mail = render(&input(Kind::T7, bt, Territory::DE, date(2025, 5, 1)));
            for part in [&mail.text, &mail.html] {
                assert!(part.contains(pct), "{bt:?} lacks {pct}");
                assert!(part.contains(min), "{bt:?} lacks {min}");
            }
            assert!(mail.subject.contains(pct));
        }
    }

    #[test]
    fn bulk_terms_follow_the_design() {
        assert_eq!(bulk_terms(BusinessType::Restaurant), (15, 500));
        assert_eq!(bulk_terms(BusinessType::Hotel), (20, 1000));
        assert_eq!(bulk_terms(BusinessType::Kantine), (25, 2000));
        assert_eq!(bulk_terms(BusinessType::Catering), (10, 300));
        for bt in [
            BusinessType::Grosshandel,
            BusinessType::Leh,
            BusinessType::Bildung,
            BusinessType::Gesundheit,
            BusinessType::Sonstiges,
        ] {
            assert_eq!(bulk_terms(bt), (10, 250));
        }
    }

    #[test]
    fn euro_amounts_are_grouped_with_dots() {
        assert_eq!(euros(0), "0 €");
        assert_eq!(euros(250), "250 €");
        assert_eq!(euros(1000), "1.000 €");
        assert_eq!(euros(12_345), "12.345 €");
        assert_eq!(euros(1_234_567), "1.234.567 €");
    }

    #[test]
    fn a_hostile_company_name_is_escaped_in_html_and_verbatim_in_text() {
        let hostile = "<script>alert(1)</script> & Söhne";
        for &kind in Kind::ALL {
            let mut i = input(
                kind,
                BusinessType::Restaurant,
                Territory::DE,
                date(2025, 3, 1),
            );
            i.company_name = hostile;
            i.contact_person = Some("\"O'Brien\" <b>");
            i.sender_name = "Eve <img src=x>";
            let mail = render(&i);
            assert!(mail.text.contains(hostile), "{kind:?}");
            assert!(mail.subject.contains(hostile), "{kind:?}");
            assert!(mail
                .html
                .contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; Söhne"));
            assert!(mail.html.contains("&quot;O&#39;Brien&quot; &lt;b&gt;"));
            assert!(mail.html.contains("Eve &lt;img src=x&gt;"));
            let lower = mail.html.to_lowercase();
            assert!(!lower.contains("<script"), "{kind:?}");
            assert!(!lower.contains("<img"), "{kind:?}");
            assert!(!lower.contains("<b>"), "{kind:?}");
        }
    }

    #[test]
    fn a_hostile_unsubscribe_url_cannot_break_out_of_the_href_attribute() {
        let mut i = input(
            Kind::T3,
            BusinessType::Hotel,
            Territory::AT,
            date(2025, 8, 1),
        );
        i.unsubscribe_url = "https://x.example/u?t=1\"><script>x</script>&a='b'";
        let mail = render(&i);
        assert!(mail.html.contains(
            "href=\"https://x.example/u?t=1&quot;&gt;&lt;script&gt;x&lt;/script&gt;&amp;a=&#39;b&#39;\""
        ));
        assert!(!mail.html.contains("<script"));
    }

    #[test]
    fn line_breaks_in_values_cannot_add_lines_to_the_subject_or_body() {
        let mut i = input(
            Kind::T7,
            BusinessType::Hotel,
            Territory::DE,
            date(2025, 8, 1),
        );
        i.company_name = "Hotel Post\r\nBcc: victim@example.com";
        i.contact_person = Some("Anna\nMüller");
        let mail = render(&i);
        assert!(!mail.subject.contains('\r') && !mail.subject.contains('\n'));
        assert!(mail.subject.contains("Hotel Post  Bcc: victim@example.com"));
        assert!(mail.text.contains("Guten Tag Anna Müller,"));
        assert!(!mail.text.contains('\r'));
    }

    #[test]
    fn the_salutation_is_neutral_without_a_contact_person() {
        for contact in [None, Some(""), Some("   ")] {
            let mut i = input(
                Kind::T3,
                BusinessType::Kantine,
                Territory::DE,
                date(2025, 6, 1),
            );
            i.contact_person = contact;
            let mail = render(&i);
            assert!(mail.text.starts_with("Guten Tag,\n\n"), "{contact:?}");
            assert!(mail.html.contains(">Guten Tag,</p>"), "{contact:?}");
        }
    }

    #[test]
    fn t3_suggests_by_business_type_and_season() {
        let cases = [
            (BusinessType::Restaurant, "Mittagstisch"),
            (BusinessType::Restaurant, "À-la-carte"),
            (BusinessType::Hotel, "Frühstücksbuffet"),
            (BusinessType::Hotel, "Bankett"),
            (
                BusinessType::Kantine,
                "Gemeinschaftsverpflegung großer Mengen",
            ),
            (BusinessType::Catering, "Events"),
            (BusinessType::Bildung, "Schul- und Mensaverpflegung"),
            (BusinessType::Gesundheit, "Klinik und Pflege"),
            (BusinessType::Leh, "Sortiment"),
            (BusinessType::Grosshandel, "Sortiment"),
            (BusinessType::Sonstiges, "Querschnitt"),
        ];
        for (bt, needle) in cases {
            let mail = render(&input(Kind::T3, bt, Territory::DE, date(2025, 4, 1)));
            assert!(mail.text.contains(needle), "{bt:?} lacks {needle}");
            assert!(mail.text.contains("Cook&Fresh Probierbox"));
            assert!(mail.html.contains("Cook&amp;Fresh Probierbox"));
        }
        let seasons = [
            (date(2025, 4, 1), "Spargel"),
            (date(2025, 7, 1), "Grill- und Salatsaison"),
            (date(2025, 7, 1), "Beeren"),
            (date(2025, 10, 1), "Oktoberfest"),
            (date(2025, 10, 1), "Kürbis"),
            (date(2025, 12, 1), "Weihnachtsmenüs"),
            (date(2025, 12, 1), "Gänse"),
        ];
        for (d, needle) in seasons {
            let mail = render(&input(Kind::T3, BusinessType::Hotel, Territory::DE, d));
            assert!(mail.text.contains(needle), "{d} lacks {needle}");
        }
    }

    #[test]
    fn swiss_mails_write_ss_in_template_text_but_keep_the_company_name_verbatim() {
        let mut i = input(
            Kind::T7,
            BusinessType::Kantine,
            Territory::CH,
            date(2025, 2, 1),
        );
        i.company_name = "Großküche Bern";
        let mail = render(&i);
        assert!(mail.text.contains("Mit freundlichen Grüssen"));
        assert!(mail.text.contains("Grossbestellung"));
        assert!(mail.subject.contains("Grossbestellung"));
        assert!(mail.subject.starts_with("Großküche Bern:"));
        assert!(mail.text.contains("Großküche Bern"));
        let de = render(&input(
            Kind::T7,
            BusinessType::Kantine,
            Territory::DE,
            date(2025, 2, 1),
        ));
        assert!(de.text.contains("Mit freundlichen Grüßen"));
        assert!(de.subject.contains("Großbestellung"));
    }

    #[test]
    fn the_template_id_is_deterministic_and_names_kind_type_and_season() {
        let i = input(
            Kind::T3,
            BusinessType::Restaurant,
            Territory::DE,
            date(2025, 1, 15),
        );
        assert_eq!(render(&i).template, "T3/RESTAURANT/WINTER");
        assert_eq!(render(&i), render(&i));
        let i = input(
            Kind::T7,
            BusinessType::Hotel,
            Territory::AT,
            date(2025, 7, 15),
        );
        assert_eq!(render(&i).template, "T7/HOTEL");
        let i = input(
            Kind::T3,
            BusinessType::Kantine,
            Territory::CH,
            date(2025, 9, 1),
        );
        assert_eq!(render(&i).template, "T3/KANTINE/AUTUMN");
    }

    #[test]
    fn seasons_change_at_the_month_boundaries() {
        assert_eq!(season(date(2025, 2, 28)), Season::Winter);
        assert_eq!(season(date(2024, 2, 29)), Season::Winter);
        assert_eq!(season(date(2025, 3, 1)), Season::Spring);
        assert_eq!(season(date(2025, 5, 31)), Season::Spring);
        assert_eq!(season(date(2025, 6, 1)), Season::Summer);
        assert_eq!(season(date(2025, 8, 31)), Season::Summer);
        assert_eq!(season(date(2025, 9, 1)), Season::Autumn);
        assert_eq!(season(date(2025, 11, 30)), Season::Autumn);
        assert_eq!(season(date(2025, 12, 1)), Season::Winter);
        assert_eq!(season(date(2026, 1, 1)), Season::Winter);
    }

    #[test]
    fn kind_spellings_round_trip() {
        for &k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
            assert_eq!(k.metric_label(), k.as_str().to_lowercase());
        }
        assert_eq!(Kind::parse("t3"), None);
        assert_eq!(Kind::parse("BATCH"), None);
    }
}
