//! Cost of contact-data encryption (`cargo bench --bench pii`): µs per value for seal, open and
//! lookup hash, per created lead (3 values sealed + 2 hashes) and per listed page of 50 leads
//! (150 values opened). Plain `std::time::Instant` loops after a warm-up; writes the markdown
//! report to reports/pii-bench.md and prints it.
//!
//! Only under `cargo bench`: cargo passes `--bench` to a `harness = false` bench binary in bench
//! mode. Run any other way (`cargo test --all-targets` builds and runs it in the debug profile),
//! it measures nothing and leaves the committed report alone, so debug figures never replace it.

use std::hint::black_box;
use std::time::Instant;

use freshplan::pii::{normalize_email, normalize_phone, PiiField, Vault};
use freshplan::territory::Territory;
use uuid::Uuid;

const WARM_UP: u32 = 2_000;
const ITERATIONS: u32 = 20_000;

const NAME: &str = "Max Mustermann";
const EMAIL: &str = "max.mustermann@example.com";
const PHONE: &str = "+49 89 1234567";

/// Mean µs per call of `f` (each call does `per_call` units of work; returns µs per unit).
fn measure(iterations: u32, per_call: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..WARM_UP.min(iterations) {
        f();
    }
    let start = Instant::now();
    for _ in 0..iterations {
        f();
    }
    start.elapsed().as_secs_f64() * 1e6 / f64::from(iterations) / f64::from(per_call)
}

fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let model = field("model name").unwrap_or_else(|| "unknown CPU".into());
    let flags = field("flags").unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    format!(
        "{model} (AES-NI: {}, PCLMULQDQ: {})",
        yes(has("aes")),
        yes(has("pclmulqdq"))
    )
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn main() {
    if !std::env::args().skip(1).any(|a| a == "--bench") {
        println!(
            "benches/pii.rs: not started by `cargo bench` (no --bench argument); \
             measuring nothing and leaving reports/pii-bench.md unchanged"
        );
        return;
    }
    let vault =
        Vault::new(vec![("k1".into(), vec![7; 32])], "k1", vec![9; 32]).expect("bench keys");
    let lead = Uuid::now_v7();
    let sealed = vault.seal(lead, PiiField::Email, EMAIL);

    let seal = measure(ITERATIONS, 1, || {
        black_box(vault.seal(black_box(lead), PiiField::Email, black_box(EMAIL)));
    });
    let open = measure(ITERATIONS, 1, || {
        black_box(
            vault
                .open(black_box(lead), PiiField::Email, "k1", black_box(&sealed))
                .expect("opens"),
        );
    });
    let hash = measure(ITERATIONS, 1, || {
        black_box(vault.lookup_hash(PiiField::Email, black_box(EMAIL)));
    });
    let create = measure(ITERATIONS, 1, || {
        let email = normalize_email(black_box(EMAIL)).expect("valid email");
        let phone = normalize_phone(black_box(PHONE), Territory::DE).expect("valid phone");
        black_box(vault.seal(lead, PiiField::ContactPerson, NAME));
        black_box(vault.seal(lead, PiiField::Email, &email));
        black_box(vault.seal(lead, PiiField::Phone, PHONE));
        black_box(vault.lookup_hash(PiiField::Email, &email));
        black_box(vault.lookup_hash(PiiField::Phone, &phone));
    });
    let page: Vec<(Uuid, [Vec<u8>; 3])> = (0..50)
        .map(|_| {
            let id = Uuid::now_v7();
            let values = [
                vault.seal(id, PiiField::ContactPerson, NAME),
                vault.seal(id, PiiField::Email, EMAIL),
                vault.seal(id, PiiField::Phone, PHONE),
            ];
            (id, values)
        })
        .collect();
    let fields = [PiiField::ContactPerson, PiiField::Email, PiiField::Phone];
    let list_iterations = ITERATIONS / 50;
    let list_per_value = measure(list_iterations, 150, || {
        for (id, values) in &page {
            for (field, blob) in fields.iter().zip(values) {
                black_box(vault.open(*id, *field, "k1", blob).expect("opens"));
            }
        }
    });
    let list_page = list_per_value * 150.0;

    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let report = format!(
        "# PII encryption cost\n\n\
         Measured by `cargo bench --bench pii` (release build, `std::time::Instant`, {WARM_UP} warm-up \
         calls, then {ITERATIONS} calls; the list of 50 leads {list_iterations} times), single thread.\n\n\
         - Date: {date}\n\
         - Machine: {cores} cores (`nproc`), {cpu}\n\
         - AES-256-GCM (`aes-gcm` 0.10), HMAC-SHA-256 (`hmac` 0.12); values: \"{NAME}\", a {email_len}-byte \
         email, \"{PHONE}\"\n\n\
         | Operation | µs |\n\
         |---|---:|\n\
         | seal one value (AES-256-GCM, fresh nonce) | {seal:.2} per value |\n\
         | open one value | {open:.2} per value |\n\
         | lookup hash (HMAC-SHA-256) | {hash:.2} per value |\n\
         | create a lead: normalise, 3 values sealed + 2 hashes | {create:.2} per lead |\n\
         | list 50 leads: 150 values opened | {list_per_value:.2} per value, {list_page:.1} per page |\n",
        date = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        cpu = cpu_model(),
        email_len = EMAIL.len(),
    );
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("reports/pii-bench.md");
    if let Err(e) = std::fs::create_dir_all(path.parent().unwrap_or(std::path::Path::new(".")))
        .and_then(|()| std::fs::write(&path, &report))
    {
        eprintln!("cannot write {}: {e}", path.display());
    }
    print!("{report}");
}
