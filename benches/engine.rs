//! Engine throughput, in MB/s of scanned content, and blake3 throughput.
//!
//! * `scan/<ruleset>/<size>`: in-memory buffers of 4 KiB, 1 MiB and 64 MiB,
//!   scanned on all of the engine's threads at once ([`Engine::scan_all`]),
//!   with the shipped signatures and with a large ruleset generated here
//!   (thousands of text, hex and regex rules, seeded, so every run compiles
//!   the same rules).
//! * `blake3/<size>`: hashing on one thread, the digest every scan computes.
//!
//! Run: `cargo bench --bench engine` (add `-- scan/generated` to filter).

use std::{fmt::Write as _, path::Path, time::Duration};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use scanserver::{
    engine::{Engine, EngineConfig, ScanJob},
    signatures::Ruleset,
};

/// Buffer sizes, each with how many buffers make one iteration.
const SIZES: [(&str, usize, usize); 3] = [
    ("4KiB", 4 << 10, 1024),
    ("1MiB", 1 << 20, 16),
    ("64MiB", 64 << 20, 2),
];

/// A small deterministic generator (xorshift64*), so data and rules are the
/// same on every run without a dependency.
struct Seeded(u64);

impl Seeded {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn word(&mut self, len: usize) -> String {
        (0..len)
            .map(|_| (b'a' + self.below(26) as u8) as char)
            .collect()
    }
}

/// Content that looks like a mix of binary and text: random bytes
/// interleaved with words, as executables and documents are.
fn content(size: usize, seed: u64) -> Bytes {
    let mut rng = Seeded(seed);
    let mut data = Vec::with_capacity(size);
    while data.len() < size {
        if rng.below(2) == 0 {
            let n = 16 + rng.below(256) as usize;
            data.extend((0..n).map(|_| rng.next() as u8));
        } else {
            let len = 3 + rng.below(8) as usize;
            data.extend_from_slice(rng.word(len).as_bytes());
            data.push(b' ');
        }
    }
    data.truncate(size);
    data.into()
}

/// Writes `rules` rules of each kind (text, hex with wildcards and jumps,
/// regex) into `dir`, ten files per kind.
fn generate_ruleset(dir: &Path, rules: usize) {
    let mut rng = Seeded(0x5EED);
    for kind in ["text", "hex", "regex"] {
        for file in 0..10 {
            let mut source = String::new();
            for i in 0..rules / 10 {
                let pattern = match kind {
                    "text" => {
                        let len = 8 + rng.below(8) as usize;
                        format!("\"{}\" ascii wide nocase", rng.word(len))
                    }
                    "hex" => {
                        let bytes: Vec<_> =
                            (0..6).map(|_| format!("{:02X}", rng.below(256))).collect();
                        format!(
                            "{{ {} ?? {} [2-8] {} }}",
                            bytes[..3].join(" "),
                            bytes[3..5].join(" "),
                            bytes[5]
                        )
                    }
                    _ => format!("/{}[0-9]{{2,6}}(\\.|-){}/", rng.word(5), rng.word(4)),
                };
                writeln!(
                    source,
                    "rule {kind}_{file}_{i} {{ meta: threat = \"Gen.{kind}\" strings: $a = {pattern} condition: $a }}"
                )
                .unwrap();
            }
            std::fs::write(dir.join(format!("{kind}_{file}.yar")), source).unwrap();
        }
    }
}

fn bench_scan(c: &mut Criterion) {
    let generated = tempfile::tempdir().unwrap();
    generate_ruleset(generated.path(), 1500);
    let rulesets = [
        (
            "shipped",
            Ruleset::load(Path::new("signatures"), None).unwrap(),
        ),
        ("generated", Ruleset::load(generated.path(), None).unwrap()),
    ];
    for (name, ruleset) in rulesets {
        eprintln!("{name}: {} rules", ruleset.rule_count());
        // The verdict cache is off: every iteration scans the same buffers.
        let config = EngineConfig {
            cache_budget: 0,
            ..EngineConfig::default()
        };
        let engine = Engine::new(ruleset, &config).unwrap();
        let mut group = c.benchmark_group(format!("scan/{name}"));
        group.sample_size(10).warm_up_time(Duration::from_secs(1));
        for (label, size, count) in SIZES {
            let buffers: Vec<_> = (0..count).map(|i| content(size, i as u64 + 1)).collect();
            group.throughput(Throughput::Bytes((size * count) as u64));
            group.bench_function(BenchmarkId::from_parameter(label), |b| {
                b.iter(|| scan_all(&engine, &buffers));
            });
        }
        group.finish();
    }
}

/// Scans every buffer on the engine's pool and checks that none failed.
fn scan_all(engine: &Engine, buffers: &[Bytes]) {
    let jobs = buffers
        .iter()
        .map(|data| ScanJob::bytes(data.clone(), None));
    engine.scan_all(jobs, |_, outcome| {
        assert!(outcome.verdict.failure().is_none(), "{:?}", outcome.verdict);
    });
}

fn bench_blake3(c: &mut Criterion) {
    let mut group = c.benchmark_group("blake3");
    for (label, size, _) in SIZES {
        let data = content(size, 7);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::from_parameter(label), |b| {
            b.iter(|| blake3::hash(&data))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_scan, bench_blake3);
criterion_main!(benches);
