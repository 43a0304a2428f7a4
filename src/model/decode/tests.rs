//! The decoder against the serde path (generated, corrupted and hand-written bodies),
//! and its number lanes against fast-float2.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::super::{parse_batch, parse_batch_serde, Limits, Rejection};
use crate::config::PartSettings;
use crate::model::{Metadata, Part, Schema};

fn schema() -> Schema {
    Schema::new(&[
        PartSettings { type_name: "T".into(), field: "t".into(), dims: 3 },
        PartSettings { type_name: "I".into(), field: "i".into(), dims: 2 },
        PartSettings { type_name: "V".into(), field: "v".into(), dims: 6 },
    ])
}

const LIMITS: Limits =
    Limits { max_id_bytes: 24, similarity: crate::config::Similarity::L2Norm, max_metadata_bytes: usize::MAX };

/// What a path made of a body, with vectors as bits so that `-0.0`, NaN payloads and
/// rounding are compared exactly.
#[derive(Debug, PartialEq)]
struct Outcome {
    parts: Vec<(String, usize, Vec<u32>, Option<Metadata>)>,
    rejected: Vec<Rejection>,
}

fn outcome((parts, rejected): (Vec<Part>, Vec<Rejection>)) -> Outcome {
    let parts =
        parts.into_iter().map(|p| (p.id, p.slot, p.vector.iter().map(|x| x.to_bits()).collect(), p.metadata)).collect();
    Outcome { parts, rejected }
}

fn fast(body: &[u8]) -> Result<Outcome, String> {
    parse_batch(body, &schema(), LIMITS).map(outcome).map_err(|e| e.to_string())
}

fn serde(body: &[u8]) -> Result<Outcome, String> {
    parse_batch_serde(body, &schema(), LIMITS).map(outcome).map_err(|e| e.to_string())
}

/// Both paths agree: the same outcome, or both fail. One allowed difference: where
/// serde_json fails on a number too large for an `f64`, the fast path may succeed
/// (an element like that becomes an infinity and its item is rejected).
fn assert_same(body: &[u8]) {
    match (fast(body), serde(body)) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "body: {}", String::from_utf8_lossy(body)),
        (Err(_), Err(_)) => {}
        (Ok(_), Err(e)) if e.starts_with("number out of range") => {}
        (a, b) => panic!("fast: {a:?}\nserde: {b:?}\nbody: {}", String::from_utf8_lossy(body)),
    }
}

// ---- generators ---------------------------------------------------------------------

/// A JSON string literal mixing plain text, escapes, raw and escaped non-ASCII (with
/// surrogate pairs); escaped control characters (which make a bad id) are rarer.
fn string(rng: &mut StdRng, max_pieces: usize) -> String {
    const PIECES: &[&str] = &[
        "a",
        "sku",
        "-",
        "7",
        " ",
        "é",
        "日本",
        "😀",
        "\\\"",
        "\\\\",
        "\\/",
        "\\u00e9",
        "\\u00E9",
        "\\u20ac",
        "\\ud83d\\ude00",
        "\\uD834\\uDD1E",
        "\\u0041",
    ];
    const CONTROL: &[&str] = &["\\b", "\\f", "\\n", "\\r", "\\t", "\\u0000", "\\u001f"];
    let n = rng.random_range(0..=max_pieces);
    let piece = |rng: &mut StdRng| {
        let from = if rng.random_bool(0.03) { CONTROL } else { PIECES };
        from[rng.random_range(0..from.len())]
    };
    let body: String = (0..n).map(|_| piece(rng)).collect();
    format!("\"{body}\"")
}

/// `x` printed exactly, then nudged just below (`-1`) or above (`1`) by a digit far
/// past `f64` precision, or left exact (`0`).
fn exact_decimal(x: f64, nudge: i32) -> String {
    let text = format!("{x:.110e}");
    let (mantissa, exponent) = text.split_once('e').unwrap();
    let mut digits: Vec<u8> = mantissa.bytes().collect();
    match nudge {
        1 => digits.push(b'1'),
        -1 => {
            // ...d000 -> ...(d-1)999: the exact value minus one unit in the last place.
            let last = digits.iter().rposition(|&d| (b'1'..=b'9').contains(&d)).unwrap();
            digits[last] -= 1;
            for d in &mut digits[last + 1..] {
                *d = b'9';
            }
            digits.push(b'9');
        }
        _ => {}
    }
    format!("{}e{exponent}", String::from_utf8(digits).unwrap())
}

/// A number as clients print them, and the awkward cases: exponents in every form,
/// signed zeros, subnormals, values next to a halfway point between two `f32`s
/// (where rounding through `f64` matters), very long digit strings, `f32` overflow.
fn number(rng: &mut StdRng) -> String {
    let x: f32 = rng.random_range(-1.0f32..1.0) * 10f32.powi(rng.random_range(-8..8));
    match rng.random_range(0..16) {
        0 | 1 => format!("{}", x as f64),
        2 | 3 => ryu::Buffer::new().format(x).to_owned(),
        4 => format!("{}", rng.random_range(-100_000i64..100_000)),
        5 => ["0", "-0", "0.0", "-0.0", "0e0", "-0E-0", "0.000e+00", "1E0", "1e+1", "-2.5E-3"][rng.random_range(0..10)]
            .to_owned(),
        6 => {
            let text = format!("{:e}", x as f64);
            let (mantissa, exponent) = text.split_once('e').unwrap();
            let (sign, digits) = exponent.strip_prefix('-').map_or(("", exponent), |d| ("-", d));
            let sign = if sign.is_empty() && rng.random_bool(0.5) { "+" } else { sign };
            let e = ["e", "E"][rng.random_range(0..2)];
            format!("{mantissa}{e}{sign}{}{digits}", "0".repeat(rng.random_range(0..3)))
        }
        7 => {
            let sub = f32::from_bits(rng.random_range(1..0x0080_0000u32));
            [format!("{:e}", sub as f64), ryu::Buffer::new().format(sub).to_owned()][rng.random_range(0..2)].clone()
        }
        8 => ["5e-324", "4.9406564584124654e-324", "2.2250738585072014e-308", "1e-400", "-1e-46", "7e-46"]
            [rng.random_range(0..6)]
        .to_owned(),
        9 | 10 => {
            let next = f32::from_bits(x.to_bits() + 1);
            let mid = (x as f64 + next as f64) / 2.0;
            exact_decimal(mid, rng.random_range(-1..=1))
        }
        11 => {
            let len = rng.random_range(20..400);
            let digits: String = (0..len).map(|_| char::from(b'0' + rng.random_range(0..10u8))).collect();
            let digits = digits.trim_start_matches('0');
            let digits = if digits.is_empty() { "1" } else { digits };
            format!("0.{digits}")
        }
        12 => {
            let len = rng.random_range(20..60);
            let digits: String = (0..len).map(|_| char::from(b'0' + rng.random_range(0..10u8))).collect();
            format!("{}{}e-{}", rng.random_range(1..10), digits, len + rng.random_range(0..5))
        }
        13 if rng.random_bool(0.2) => {
            ["1e39", "-3.5e38", "3.4028236e38", "1.7976931348623157e308"][rng.random_range(0..4)].to_owned()
        }
        13 => ["3.4028235e38", "-3.4028234663852886e38", "3.40282356e38"][rng.random_range(0..3)].to_owned(),
        14 => format!("{}", rng.random::<u64>()) + &"0".repeat(rng.random_range(0..5)),
        _ => format!("{:.9}", x),
    }
}

fn whitespace(rng: &mut StdRng) -> &'static str {
    [" ", "", "", "\n", "\t", "\r\n  "][rng.random_range(0..6)]
}

/// Any JSON value, for unknown keys and metadata.
fn value(rng: &mut StdRng, depth: u32) -> String {
    let pick = if depth == 0 { rng.random_range(0..5) } else { rng.random_range(0..7) };
    match pick {
        0 => "null".to_owned(),
        1 => ["true", "false"][rng.random_range(0..2)].to_owned(),
        2 => number(rng).replace("1e39", "1e3").replace("1e-400", "0"),
        3 | 4 => string(rng, 4),
        5 => {
            let n = rng.random_range(0..4);
            let elements: Vec<_> = (0..n).map(|_| value(rng, depth - 1)).collect();
            format!("[{}]", elements.join(", "))
        }
        _ => object(rng, depth - 1),
    }
}

fn object(rng: &mut StdRng, depth: u32) -> String {
    let n = rng.random_range(0..4);
    let members: Vec<_> = (0..n).map(|_| format!("{}:{}", string(rng, 2), value(rng, depth))).collect();
    format!("{{{}}}", members.join(","))
}

/// A value of a type the field does not want.
fn wrong(rng: &mut StdRng) -> String {
    ["7", "-1.5e3", "null", "true", "false", "[1, \"a\", {\"k\": [2]}]", "{\"a\": {\"b\": null}}", "\"x\""]
        [rng.random_range(0..8)]
    .to_owned()
}

fn vector(rng: &mut StdRng, dims: usize) -> String {
    let len = if rng.random_bool(0.9) { dims } else { rng.random_range(0..8) };
    let elements: Vec<_> = (0..len)
        .map(|_| {
            let e = if rng.random_bool(0.02) { wrong(rng) } else { number(rng) };
            format!("{}{e}", whitespace(rng))
        })
        .collect();
    format!("[{}]", elements.join(","))
}

fn item(rng: &mut StdRng) -> String {
    let types = [("\"T\"", 3), ("\"I\"", 2), ("\"V\"", 6), ("\"V\"", 6), ("\"\\u0054\"", 3), ("\"AUDIO\"", 3)];
    let (type_name, dims) = types[rng.random_range(0..types.len())];
    let mut members = Vec::new();
    let mut add = |rng: &mut StdRng, key: &str, value: String, p: f64| {
        if rng.random_bool(p) {
            members.push(format!("\"{key}\"{}:{}{value}", whitespace(rng), whitespace(rng)));
        }
    };
    // A leading `i`: an empty id is one more way to be rejected, and there are enough.
    let id = if rng.random_bool(0.9) { format!("\"i{}", &string(rng, 4)[1..]) } else { wrong(rng) };
    add(rng, "id", id, 0.97);
    let type_value = if rng.random_bool(0.95) { type_name.to_owned() } else { wrong(rng) };
    add(rng, "embedding_type", type_value, 0.97);
    let embedding = if rng.random_bool(0.95) { vector(rng, dims) } else { wrong(rng) };
    add(rng, "embedding", embedding, 0.97);
    let metadata = match rng.random_range(0..10) {
        0 => "null".to_owned(),
        1 => wrong(rng),
        2 => format!("{{\"{}\": 1}}", ["id", "t", "completed_at"][rng.random_range(0..3)]),
        _ => object(rng, 2),
    };
    add(rng, "metadata", metadata.clone(), 0.4);
    for _ in 0..rng.random_range(0..3) {
        let key = ["extra", "Id", "embeddings", "embedding_typ", "\\u0069d", "k\\n"][rng.random_range(0..6)];
        // `\u0069d` is `id`: a second id, which wins.
        let extra = if key == "\\u0069d" { string(rng, 3) } else { value(rng, 3) };
        add(rng, key, extra, 1.0);
    }
    members.shuffle(rng);
    format!("{{{}}}", members.join(","))
}

fn body(rng: &mut StdRng, max_items: usize) -> String {
    let n = rng.random_range(0..=max_items);
    let items: Vec<_> = (0..n).map(|_| format!("{}{}", whitespace(rng), item(rng))).collect();
    let items = format!("[{}]", items.join(","));
    if rng.random_bool(0.05) {
        return format!("[{items}]");
    }
    let mut members = vec![format!("\"embeddings\":{}{items}", whitespace(rng))];
    for _ in 0..rng.random_range(0..3) {
        members.push(format!("{}:{}", string(rng, 3), value(rng, 3)));
    }
    members.shuffle(rng);
    format!("{}{{{}}}{}", whitespace(rng), members.join(","), whitespace(rng))
}

// ---- equivalence --------------------------------------------------------------------

#[test]
fn generated_bodies_decode_the_same_through_both_paths() {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    for _ in 0..1500 {
        let body = body(&mut rng, 6);
        assert!(serde(body.as_bytes()).is_ok(), "the generator makes valid JSON: {body}");
        assert_same(body.as_bytes());
    }
}

#[test]
fn generated_numbers_round_like_serde_and_std() {
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..20_000 {
        let text = number(&mut rng);
        let body = format!("{{\"embeddings\":[{{\"id\":\"a\",\"embedding_type\":\"I\",\"embedding\":[{text}, 0]}}]}}");
        let bits = |o: Result<Outcome, String>| -> Option<u32> {
            let o = o.unwrap();
            o.parts.first().map(|p| p.2[0]).or_else(|| o.rejected.first().map(|_| 0x7f80_0000))
        };
        let want = (text.parse::<f64>().unwrap() as f32).to_bits();
        // A value whose square overflows f32 is refused too (Elasticsearch's magnitude check).
        let x = f32::from_bits(want);
        let want = if (x * x).is_finite() { want } else { 0x7f80_0000 };
        assert_eq!(bits(fast(body.as_bytes())), Some(want), "{text}");
        assert_eq!(bits(serde(body.as_bytes())), Some(want), "{text}");
    }
}

/// The quick path of `Decimal::quick_f32` against fast-float2, where it matters most:
/// decimals a few `f64` ulps from a point halfway between two `f32`s, and plain ones
/// of every length and exponent it handles.
#[test]
fn the_quick_f32_path_equals_fast_float_then_as_f32() {
    let mut rng = StdRng::seed_from_u64(99);
    let mut texts = Vec::new();
    for _ in 0..2000 {
        let x: f32 = rng.random_range(0.5f32..1.0) * 10f32.powi(rng.random_range(-30..30));
        let mid = (x as f64 + f32::from_bits(x.to_bits() + 1) as f64) / 2.0;
        for k in [-200i64, -65, -64, -63, -5, -1, 0, 1, 5, 63, 64, 65, 200] {
            let near = f64::from_bits((mid.to_bits() as i64 + k) as u64);
            texts.push(format!("{near:e}"));
            texts.push(format!("{near:?}"));
        }
    }
    for _ in 0..50_000 {
        let digits = rng.random_range(1..=20);
        let mantissa: String = (0..digits).map(|_| char::from(b'0' + rng.random_range(0..10u8))).collect();
        let mantissa = mantissa.trim_start_matches('0');
        let mantissa = if mantissa.is_empty() { "1" } else { mantissa };
        texts.push(format!("-{mantissa}e{}", rng.random_range(-70..40)));
        let point = rng.random_range(0..=mantissa.len());
        texts.push(format!("0.{}{mantissa}", "0".repeat(rng.random_range(0..25))));
        texts.push(format!("{}.{}0", &mantissa[..point.max(1)], &mantissa[point.max(1)..]));
    }
    let mut quick = 0;
    for text in &texts {
        let decimal = super::float::scan_decimal(text.as_bytes(), 0).unwrap();
        assert_eq!(decimal.end, text.len(), "{text}");
        let want = fast_float2::parse::<f64, _>(text).unwrap() as f32;
        if let Some(got) = decimal.quick_f32() {
            assert_eq!(got.to_bits(), want.to_bits(), "{text}");
            quick += 1;
        }
    }
    assert!(quick > texts.len() / 2, "the quick path took only {quick} of {}", texts.len());
}

/// `common_number` must take only valid numbers, end them where the full scan does,
/// and round them the same; whatever it declines goes to the full scan anyway.
#[test]
fn the_common_number_lane_agrees_with_the_full_scan() {
    let mut rng = StdRng::seed_from_u64(5);
    let mut texts: Vec<String> = (0..20_000).map(|_| number(&mut rng)).collect();
    const ALPHABET: &[u8] = b"0000123456789..--+eE";
    for _ in 0..60_000 {
        let len = rng.random_range(1..30);
        texts.push((0..len).map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())])).collect());
    }
    let mut taken = 0;
    for text in &texts {
        let tail = [", 1.5]", "]", " ,", "x", "e5", ".5"][rng.random_range(0..6)];
        let body = format!("{text}{tail}{}", " ".repeat(super::float::WINDOW));
        let Some((x, end)) = super::float::common_number(body.as_bytes(), 0) else { continue };
        taken += 1;
        let decimal = super::float::scan_decimal(body.as_bytes(), 0).unwrap_or_else(|_| panic!("took {body:?}"));
        assert_eq!(end, decimal.end, "{body:?}");
        let want = fast_float2::parse::<f64, _>(&body[..end]).unwrap() as f32;
        assert_eq!(x.to_bits(), want.to_bits(), "{body:?}");
    }
    assert!(taken > 20_000, "the lane took only {taken}");
}

#[test]
fn digit_runs_stop_at_any_non_digit() {
    let mut rng = StdRng::seed_from_u64(8);
    for n in 0..=8 {
        for stop in (0..=255u8).filter(|b| !b.is_ascii_digit()) {
            let mut bytes: Vec<u8> = (0..n).map(|_| b'0' + rng.random_range(0..10u8)).collect();
            bytes.push(stop);
            bytes.extend((0..8).map(|_| rng.random::<u8>()));
            let text = std::str::from_utf8(&bytes[..n]).unwrap();
            let want = if n == 0 { 0 } else { text.parse::<u64>().unwrap() };
            assert_eq!(super::float::digit_run(&bytes, 0), Some((want, n)), "{bytes:?}");
        }
    }
}

#[test]
fn the_ingest_examples_decode_the_same_through_both_paths() {
    let bodies = [
        r#"{"embeddings": [{"id": "a", "embedding_type": "T", "embedding": [1, 2.5, -3e-2], "extra": {"x": [1]}},
            {"id": "a", "embedding_type": "I", "embedding": [0.1, 0.2], "metadata": {"lang": "en"}}]}"#,
        r#"{"embeddings": [{"id": "ok", "embedding_type": "T", "embedding": [1, 2, 3]},
            {"id": "x", "embedding_type": "AUDIO", "embedding": [1, 2, 3]},
            {"id": "x", "embedding_type": "T", "embedding": [1, 2]},
            {"id": "x", "embedding_type": "T", "embedding": [1, "2", 3]},
            {"id": "", "embedding_type": "T", "embedding": [1, 2, 3]},
            {"id": "1234567890123456789012345", "embedding_type": "T", "embedding": [1, 2, 3]},
            {"id": 7, "embedding_type": "T", "embedding": [1, 2, 3]},
            {"id": "x", "embedding_type": "T", "embedding": [1, 2, 1e39]},
            {"id": "x", "embedding_type": "T", "embedding": [1, 2, 3], "metadata": {"id": "no"}},
            {"embedding_type": "T", "embedding": [1, 2, 3]},
            {"id": "x", "embedding_type": "T", "embedding": "1,2,3"}]}"#,
        r#"{"embeddings": ["#,
        r#"{"items": []}"#,
        "[1,2]",
    ];
    for body in bodies {
        assert_same(body.as_bytes());
    }
    assert_eq!(fast(bodies[1].as_bytes()).unwrap().rejected.len(), 10);
}

// ---- corrupted bodies ---------------------------------------------------------------

const SMALL: &str = r#"{"pad": [1, {"k": "v\u00e9"}], "embeddings": [
    {"id": "a\"b\\n", "embedding_type": "T", "embedding": [1, -2.5e-3, 0.125], "metadata": {"lang": ["en", 1.5]}},
    {"embedding": [0.5, 1E2], "id": "\ud83d\ude00", "embedding_type": "I", "x": null},
    {"id": 3, "embedding_type": "T", "embedding": [true, 1, 2]}]}"#;

#[test]
fn every_truncation_fails_in_both_paths() {
    assert!(fast(SMALL.as_bytes()).is_ok());
    for end in 0..SMALL.len() {
        let cut = &SMALL.as_bytes()[..end];
        assert!(fast(cut).is_err(), "{}", String::from_utf8_lossy(cut));
        assert_same(cut);
    }
}

/// Bytes that change JSON's meaning get most of the draws.
fn random_byte(rng: &mut StdRng) -> u8 {
    const TELLING: &[u8] = b"{}[],:\"\\ 0123456789-+.eEtrufalsnu/\n\t\x00\x1f\x7f\x80\xbf\xc3\xe9\xed\xf0\xff";
    if rng.random_bool(0.8) {
        TELLING[rng.random_range(0..TELLING.len())]
    } else {
        rng.random()
    }
}

fn mutate(rng: &mut StdRng, body: &mut Vec<u8>) {
    let at = rng.random_range(0..body.len());
    match rng.random_range(0..4) {
        0 => body[at] = random_byte(rng),
        1 => body.insert(at, random_byte(rng)),
        2 => {
            body.remove(at);
        }
        _ => body[at] ^= 1 << rng.random_range(0..8),
    }
}

#[test]
fn corrupted_bodies_get_the_same_answer_from_both_paths() {
    let mut rng = StdRng::seed_from_u64(42);
    for round in 0..6000 {
        let mut body = if round % 2 == 0 { SMALL.as_bytes().to_vec() } else { body(&mut rng, 2).into_bytes() };
        if body.is_empty() {
            continue;
        }
        for _ in 0..rng.random_range(1..=3) {
            if !body.is_empty() {
                mutate(&mut rng, &mut body);
            }
        }
        assert_same(&body);
    }
}

// ---- the edges, one by one ----------------------------------------------------------

fn with_vector(elements: &str) -> String {
    format!(r#"{{"embeddings":[{{"id":"a","embedding_type":"T","embedding":[{elements}]}}]}}"#)
}

fn with_id(id: &str) -> String {
    format!(r#"{{"embeddings":[{{"id":{id},"embedding_type":"I","embedding":[1,2]}}]}}"#)
}

#[test]
fn syntax_errors_fail_the_request_in_both_paths() {
    let bodies = [
        with_vector("1,2,3") + "x",
        with_vector("1,2,3") + "{}",
        with_vector("1 2,3"),
        with_vector("1,2,3,"),
        with_vector("1,,3"),
        with_vector("01,2,3"),
        with_vector("1.,2,3"),
        with_vector(".5,2,3"),
        with_vector("+1,2,3"),
        with_vector("1e,2,3"),
        with_vector("1e+,2,3"),
        with_vector("-,2,3"),
        with_vector("- 1,2,3"),
        with_vector("tru,2,3"),
        with_vector("nul,2,3"),
        with_vector("1,2,3]"),
        with_vector("-NaN,2,3"),
        with_vector("nan,2,3"),
        with_vector("inf,2,3"),
        with_id("\"a"),
        with_id("\"a\tb\""),
        with_id("\"a\\xb\""),
        with_id("\"a\\u12\""),
        with_id("\"a\\u12g4\""),
        with_id("\"\\ud800\""),
        with_id("\"\\udc00\""),
        with_id("\"\\ud800\\u0041\""),
        with_id("\"\\ud800x\""),
        with_id("NaN"),
        with_id("Infinity"),
        with_id("1e400"),
        with_id("[NaN]"),
        r#"{"embeddings":[{"id":"a","embedding_type":"I","embedding":[1,2],"metadata":{"x":1e400}}]}"#.into(),
        r#"{"embeddings":[{"id":"a","embedding_type":"I","embedding":[1,2],"metadata":{"x":"\udc00"}}]}"#.into(),
        r#"{"embeddings":[{"id":"a","embedding_type":"I","embedding":{"\ud800":1}}]}"#.into(),
        r#"{"embeddings":[{"id":"a","embedding_type":"I","embedding":[[NaN]]}]}"#.into(),
        r#"{"embeddings":[{"id":"a","embedding_type":"I","embedding":[1,2]},]}"#.into(),
        r#"{"embeddings":[{"id":"a","embedding_type":"I","embedding":[1,2],}]}"#.into(),
        r#"{"embeddings":[{,"id":"a"}]}"#.into(),
        r#"{"embeddings":[{"id" "a"}]}"#.into(),
        r#"{"embeddings":[{"id":"a" "x":1}]}"#.into(),
        r#"{"embeddings":[{"id":"a"}], "embeddings": []}"#.into(),
        r#"{"embeddings":[null]}"#.into(),
        r#"{"embeddings":null}"#.into(),
        r#"{"embeddings":[], "x": [1,]}"#.into(),
        r#"{"embeddings":[], "x": {"a":1,}}"#.into(),
        r#"{"embeddings":[], "x": {"a" 1}}"#.into(),
        r#"{"embeddings":[], "x": "\q"}"#.into(),
        r#"{"embeddings":[], 7: 1}"#.into(),
        "{\"embeddings\":[], \"x\": \"a\x01\"}".into(),
        "\u{feff}{\"embeddings\":[]}".into(),
        "[]".into(),
        "[[], []]".into(),
        "".into(),
        "   ".into(),
        "{}".into(),
    ];
    for body in &bodies {
        assert!(fast(body.as_bytes()).is_err(), "fast path took {body}");
        assert!(serde(body.as_bytes()).is_err(), "serde path took {body}");
    }
    let mut invalid_utf8 = with_id("\"a\u{e9}\"").into_bytes();
    let at = invalid_utf8.iter().position(|&b| b == 0xc3).unwrap();
    invalid_utf8[at + 1] = b'!';
    assert!(fast(&invalid_utf8).is_err());
    assert!(serde(&invalid_utf8).is_err());
}

#[test]
fn what_serde_accepts_the_fast_path_accepts() {
    let mut bodies: Vec<Vec<u8>> = vec![
        // The sequence form of the request struct.
        br#"[[{"id":"a","embedding_type":"I","embedding":[1,2]}]]"#.to_vec(),
        // Later duplicates win; escaped keys are keys.
        br#"{"embeddings":[{"id":"a","id":"b","\u0065mbedding_type":"I","embedding":[9],"embedding":[1,2]}]}"#.to_vec(),
        br#"{"embeddings":[{"id":"a","embedding_type":"I","embedding":[1,2],"metadata":{"k":1},"metadata":null}]}"#
            .to_vec(),
        // Skipped strings are not checked for surrogates.
        br#"{"x":"\udc00","embeddings":[{"id":"a","embedding_type":"I","embedding":[1,2],"y":["\ud800"]}]}"#.to_vec(),
        br#"{"embeddings":[{"id":["\ud800"],"embedding_type":"I","embedding":[1,{"k":"\udc00"}]}]}"#.to_vec(),
        // Numbers out of range where serde only skips them.
        br#"{"embeddings":[{"id":"a","embedding_type":"I","embedding":[1,[1e400]],"x":-1e999}]}"#.to_vec(),
        br#"{"embeddings":[{"id":"a","embedding_type":"I","embedding":[0e999999999999, -1e-99999999999]}]}"#.to_vec(),
    ];
    // Skipped strings are not checked for UTF-8 either.
    let mut raw = br#"{"x":"?","embeddings":[{"id":"a","embedding_type":"I","embedding":[1,2],"y":"?"}]}"#.to_vec();
    for b in raw.iter_mut().filter(|b| **b == b'?') {
        *b = 0xff;
    }
    bodies.push(raw);
    for body in &bodies {
        assert!(serde(body).is_ok(), "{}", String::from_utf8_lossy(body));
        assert_same(body);
    }
}

#[test]
fn python_non_finite_tokens_reject_only_their_item() {
    for token in ["NaN", "Infinity", "-Infinity"] {
        let body = format!(
            r#"{{"embeddings":[{{"id":"a","embedding_type":"T","embedding":[1, {token}, 3]}},
                {{"id":"b","embedding_type":"I","embedding":[1, 2]}}]}}"#
        );
        assert!(serde(body.as_bytes()).is_err(), "serde_json refuses {token}");
        let Outcome { parts, rejected } = fast(body.as_bytes()).unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!((rejected[0].index, rejected[0].code), (0, "non_finite"));
        assert_eq!(rejected[0].reason, "`embedding[1]` is not a finite 32-bit float");
    }
}

#[test]
fn a_number_beyond_f64_is_an_infinity_in_a_vector_and_an_error_elsewhere() {
    let body = with_vector("1, -1e400, 3");
    assert!(serde(body.as_bytes()).unwrap_err().starts_with("number out of range"));
    assert_eq!(fast(body.as_bytes()).unwrap().rejected[0].code, "non_finite");
    assert!(fast(with_id("1e400").as_bytes()).is_err());
    assert!(fast(with_id("-1e999999999999").as_bytes()).is_err());
}

#[test]
fn numbers_too_long_for_fast_float_still_round_correctly() {
    let zeros = "0".repeat(70_000);
    for text in [format!("0.{zeros}15e70001"), format!("1{zeros}e-70000"), format!("0.{zeros}1"), format!("1{zeros}")] {
        assert_same(with_vector(&format!("{text}, 1, 2")).as_bytes());
    }
    let tiny = fast(with_vector(&format!("0.{zeros}15e70001, 1, 2")).as_bytes()).unwrap();
    assert_eq!(f32::from_bits(tiny.parts[0].2[0]), 1.5);
}

#[test]
fn metadata_nests_as_deep_as_serde_allows_and_skipped_values_without_limit() {
    for depth in [123, 124, 125, 126] {
        let nested = "[".repeat(depth - 1) + &"]".repeat(depth - 1);
        let body = format!(
            r#"{{"embeddings":[{{"id":"a","embedding_type":"I","embedding":[1,2],"metadata":{{"k":{nested}}}}}]}}"#
        );
        assert_eq!(fast(body.as_bytes()).is_ok(), serde(body.as_bytes()).is_ok(), "depth {depth}");
        assert_eq!(fast(body.as_bytes()).is_ok(), depth <= 124, "depth {depth}");
    }
    let nested = "[{\"a\":".repeat(5000) + "1" + &"}]".repeat(5000);
    let body = format!(r#"{{"embeddings":[{{"id":"a","embedding_type":"I","embedding":[1,2],"x":{nested}}}]}}"#);
    assert_same(body.as_bytes());
    assert!(fast(body.as_bytes()).is_ok());
}

#[test]
fn errors_say_where_and_what() {
    let body = with_vector("1, 2 3");
    let err = parse_batch(body.as_bytes(), &schema(), LIMITS).unwrap_err();
    assert_eq!(err.offset(), body.find(" 3").unwrap() + 1);
    assert_eq!(err.to_string(), format!("invalid JSON at byte {}: expected `,` or `]`, found `3`", err.offset()));
    let err = parse_batch(b"{\"embeddings\": [", &schema(), LIMITS).unwrap_err();
    assert!(err.to_string().ends_with("found the end of the body"), "{err}");
    let err = parse_batch(b"{\"items\": []}", &schema(), LIMITS).unwrap_err();
    assert!(err.to_string().contains("`embeddings`"), "{err}");
}

#[test]
fn vectors_get_the_capacity_of_their_type_when_it_comes_first() {
    let body = r#"{"embeddings":[{"id":"a","embedding_type":"I","embedding":[1,2]},
        {"id":"b","embedding":[1,2],"embedding_type":"I"}]}"#;
    let items = super::decode_items(body.as_bytes(), &schema()).unwrap();
    let capacity = |i: usize| items[i].embedding.as_ref().unwrap().as_ref().unwrap().capacity();
    assert_eq!((capacity(0), capacity(1)), (2, 6));
}
