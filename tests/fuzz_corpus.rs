//! Runs the fuzz checks on a stable toolchain: every file of the checked-in corpus, then a
//! bounded number of deterministic mutations of each. The coverage-guided runs of the same
//! checks are the cargo-fuzz targets in `fuzz/`, which `.ci/run` starts when a nightly
//! toolchain is present.

#[path = "../fuzz/src/lib.rs"]
mod checks;

use std::path::Path;

/// Mutations per target, spread over its corpus files; a few seconds per target in a
/// release build. Each file gets at least `MIN_MUTATIONS`.
const MUTATIONS: usize = 200_000;
const MIN_MUTATIONS: usize = 50;

/// Bytes that matter to the parsers under test, spliced in by the mutator.
const TOKENS: &[&[u8]] = &[
    b"/", b"//", b".", b"..", b"%2e", b"%2E", b"%2f", b"%2F", b"%5c", b"\\", b"%00", b"%", b"?", b"#",
    b"/v2", b"/registry", b"/api/v2.0", b"/c/login", b"\"", b",", b"=", b"realm=", b"http://harbor-core",
    b"https://", b"\n", b"\r\n", b"\r\n\r\n", b"content-length: 5\r\n", b"transfer-encoding: chunked\r\n", b"upgrade: websocket\r\n",
    b"connection: upgrade\r\n", b"0\r\n\r\n", b"[", b"]", b"[[routes]]", b"prefix = ", b"strip_prefix = ", b"upstream = ", b"\xff",
];

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read the corpus {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "the corpus {} is empty", dir.display());
    files.iter().map(|file| std::fs::read(file).unwrap()).collect()
}

/// xorshift64: deterministic, so a failure reproduces with the same build.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(input: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut data = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(data.len() + 1);
        match rng.below(4) {
            0 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                data.splice(at..at, token.iter().copied());
            }
            1 if at < data.len() => {
                let end = (at + 1 + rng.below(8)).min(data.len());
                data.drain(at..end);
            }
            2 if at < data.len() => data[at] = rng.next() as u8,
            _ => data.insert(at, rng.next() as u8),
        }
    }
    data
}

fn run(target: &str, check: fn(&[u8])) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let inputs = corpus(target);
    let per_input = (MUTATIONS / inputs.len()).max(MIN_MUTATIONS);
    for input in inputs {
        check(&input);
        for _ in 0..per_input {
            let mutated = mutate(&input, &mut rng);
            let result = std::panic::catch_unwind(|| check(&mutated));
            assert!(result.is_ok(), "{target} failed on input {:?}", String::from_utf8_lossy(&mutated));
        }
    }
}

#[test]
fn route_matcher_corpus() {
    run("route_matcher", checks::route_matcher);
}

#[test]
fn rewriters_corpus() {
    run("rewriters", checks::rewriters);
}

#[test]
fn config_parse_corpus() {
    run("config_parse", checks::config_parse);
}

#[test]
fn framing_corpus() {
    run("framing", checks::framing);
}
