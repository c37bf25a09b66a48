//! Unit tests of the `fib` demo method (`src/bin/amqp-rpcd/fib.rs`), which lives with the
//! `amqp-rpcd` binary: parsing and bounds, exact values, and the work split.

#[path = "../src/bin/amqp-rpcd/fib.rs"]
mod fib;

use amqp_rpc::protocol::ErrorCode;
use amqp_rpc::service::{Method, Work};
use fib::*;
use num_bigint::BigUint;
use proptest::prelude::*;

#[test]
fn its_config_section_bounds_max_n_and_makes_fib_the_default_method() {
    let env = [("AMQP_RPC__FIB__MAX_N".to_owned(), "77".to_owned())];
    let (_, config): (_, FibConfig) =
        amqp_rpc::config::load_with_section(None, Some(env.into()), SECTION).unwrap();
    assert_eq!(config.max_n, 77);
    assert_eq!(config.validate(), Ok(()));
    let methods = config.methods();
    assert_eq!(methods.names(), ["fib"]);
    assert_eq!(methods.default_name(), Some("fib"));
    let too_big = FibConfig {
        max_n: MAX_MAX_N + 1,
    };
    assert!(too_big.validate().unwrap_err().contains("fib.max_n"));
    // A bad value and an unknown key of the section are problems named after it, reported
    // with the library's own.
    let env = [
        ("AMQP_RPC__FIB__MAX_N".to_owned(), "many".to_owned()),
        ("AMQP_RPC__LOG__FORMAT".to_owned(), "xml".to_owned()),
    ];
    let err = amqp_rpc::config::load_with_section::<FibConfig>(None, Some(env.into()), SECTION)
        .unwrap_err();
    let all = err.problems.join("\n");
    assert!(all.contains("fib:") && all.contains("log.format"), "{all}");
}

/// Independent reference: the plain iterative sum, sharing no code with `fib_decimal`.
fn fib_iterative(n: u64) -> BigUint {
    let (mut a, mut b) = (BigUint::ZERO, BigUint::from(1u32));
    for _ in 0..n {
        a += &b;
        std::mem::swap(&mut a, &mut b);
    }
    a
}

fn big(n: u64) -> BigUint {
    fib_decimal(n).parse().unwrap()
}

fn code(body: &[u8], max_n: u64) -> Result<u64, ErrorCode> {
    parse(body, max_n).map_err(|e| e.code)
}

/// What `parse` must return, computed the slow obvious way.
fn expected(body: &[u8], max_n: u64) -> Result<u64, ErrorCode> {
    let Ok(text) = std::str::from_utf8(body) else {
        return Err(ErrorCode::InvalidArgument);
    };
    let t = text.trim_matches(is_contract_space);
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ErrorCode::InvalidArgument);
    }
    match t.parse::<BigUint>().unwrap() {
        v if v <= BigUint::from(max_n) => Ok(t.parse().unwrap()),
        _ => Err(ErrorCode::OutOfRange),
    }
}

#[test]
fn known_values() {
    let small = ["0", "1", "1", "55", "6765", "832040"];
    for (n, want) in [0, 1, 2, 10, 20, 30].into_iter().zip(small) {
        assert_eq!(fib_decimal(n), want, "fib({n})");
    }
    for (n, want) in [
        (93, "12200160415121876738"),
        (94, "19740274219868223167"),
        (100, "354224848179261915075"),
        (186, "332825110087067562321196029789634457848"),
        (187, "538522340430300790495419781092981030533"),
    ] {
        assert_eq!(fib_decimal(n), want, "fib({n})");
    }
}

#[test]
fn matches_iterative_sum_across_the_fast_path_boundary() {
    for n in (180..=200).chain([255, 256, 257, 1000, 1023, 1024, 1025, 1500, 1501]) {
        assert_eq!(fib_decimal(n), fib_iterative(n).to_string(), "fib({n})");
    }
}

#[test]
fn fib_100000() {
    let digits = fib_decimal(100_000);
    assert_eq!(digits.len(), 20899);
    let reference = fib_iterative(100_000).to_string();
    assert_eq!(digits, reference);
    let prefix = concat!(
        "25974069347221724166155034021275915414880485386517",
        "69658472477070395253454351127368626555677283671674"
    );
    assert!(reference.starts_with(prefix));
}

#[test]
fn addition_identity() {
    // F(m + n) = F(m) F(n + 1) + F(m - 1) F(n)
    for (m, n) in [1, 5, 100, 187, 1000, 4097]
        .into_iter()
        .zip([1, 7, 87, 500, 2345, 3])
    {
        let sum = big(m) * big(n + 1) + big(m - 1) * big(n);
        assert_eq!(big(m + n), sum, "m={m} n={n}");
    }
}

#[test]
fn parse_classifies_bodies() {
    use ErrorCode::{InvalidArgument as Invalid, OutOfRange as Range};
    let max = DEFAULT_MAX_N;
    let ok = ["5", " 5 ", "5\n", "0007", "0", "000", "100000"];
    for (body, want) in ok.into_iter().zip([5, 5, 5, 7, 0, 0, 100_000]) {
        assert_eq!(code(body.as_bytes(), max), Ok(want), "{body:?}");
    }
    assert_eq!(code(b"\t\r\x0b\x0c42\r\n", max), Ok(42));
    // U+0665 is ARABIC-INDIC DIGIT FIVE, U+00A0 a non-ASCII space.
    let bad = [
        "+5", "-5", "1.0", "1e3", "1 2", "0x10", "abc", "5\0", "\u{665}", "\u{a0}5",
    ];
    for body in bad {
        assert_eq!(code(body.as_bytes(), max), Err(Invalid), "{body:?}");
    }
    for body in ["", "   ", "\n\t"] {
        assert_eq!(code(body.as_bytes(), max), Err(Invalid), "{body:?}");
    }
    assert_eq!(code(&[0xff, 0xfe], max), Err(Invalid));
    assert_eq!(code(b"100001", max), Err(Range));
    assert_eq!(code(b"99999999999999999999999999999", max), Err(Range));
    assert_eq!(code("7".repeat(100_000).as_bytes(), u64::MAX), Err(Range));
    assert_eq!(code(b"18446744073709551615", u64::MAX), Ok(u64::MAX));
    assert_eq!(code(b"18446744073709551616", u64::MAX), Err(Range));
    assert_eq!(code(b"0000000000000000000000000000001", 1), Ok(1));
}

#[test]
fn error_messages_are_short_and_name_the_problem() {
    let msg = |body: &[u8], max_n| parse(body, max_n).unwrap_err().message;
    assert_eq!(msg(b" ", 9), "empty body: expected a decimal integer n");
    assert!(msg(&[b'1', 0xff], 9).starts_with("body is not UTF-8"));
    assert_eq!(
        msg(b"1e3", 100_000),
        r#"invalid argument "1e3": expected a decimal integer 0..=100000"#
    );
    let long = msg(format!("x\n{}", "y".repeat(10_000)).as_bytes(), 10);
    assert!(long.starts_with(r#"invalid argument "x\nyyy"#) && long.len() < 120);
    assert!(msg("é".repeat(100).as_bytes(), 10).len() < 150);
    assert_eq!(
        msg(b"100001", 100_000),
        "n = 100001 is out of range: must be 0 <= n <= 100000"
    );
    let huge = msg(format!("000{}", "9".repeat(100_000)).as_bytes(), 5);
    assert!(huge.starts_with(&format!("n = {}... is out of range", "9".repeat(24))));
}

#[test]
fn prepare_answers_small_inline_and_defers_large() {
    // (answered inline?, reply body)
    let run = |body: &str| match Fib::new(DEFAULT_MAX_N).prepare(body.as_bytes()) {
        Ok(Work::Done(reply)) => Ok((true, reply)),
        Ok(Work::Heavy(work)) => work().map(|reply| (false, reply)).map_err(|e| e.code),
        Ok(other) => panic!("fib never asks for {other:?}"),
        Err(e) => Err(e.code),
    };
    let reply = |n: u64| fib_decimal(n).into_bytes();
    assert_eq!(Fib::new(1).name(), "fib");
    assert_eq!(run("30\n"), Ok((true, b"832040".to_vec())));
    let edge = INLINE_MAX_N;
    assert_eq!(run(&edge.to_string()), Ok((true, reply(edge))));
    assert_eq!(run(&(edge + 1).to_string()), Ok((false, reply(edge + 1))));
    assert_eq!(run("100001"), Err(ErrorCode::OutOfRange));
    assert_eq!(run("-1"), Err(ErrorCode::InvalidArgument));
}

proptest! {
    #[test]
    fn parse_never_panics_on_bytes(
        body in proptest::collection::vec(any::<u8>(), 0..=64),
        max_n in prop_oneof![Just(DEFAULT_MAX_N), any::<u64>()],
    ) {
        let got = code(&body, max_n);
        if let Ok(n) = got {
            prop_assert!(n <= max_n);
            let text = std::str::from_utf8(&body).unwrap();
            let trimmed = text.trim_matches(is_contract_space);
            prop_assert!(trimmed.bytes().all(|b| b.is_ascii_digit()));
        }
        prop_assert_eq!(got, expected(&body, max_n));
    }

    #[test]
    fn parse_round_trips_u64(
        n in prop_oneof![0..=2 * DEFAULT_MAX_N, any::<u64>()],
        max_n in prop_oneof![Just(DEFAULT_MAX_N), any::<u64>()],
    ) {
        let want = if n <= max_n { Ok(n) } else { Err(ErrorCode::OutOfRange) };
        prop_assert_eq!(code(n.to_string().as_bytes(), max_n), want);
    }

    #[test]
    fn parse_classifies_number_like_strings(s in "[ +\\-0-9.eE\\t]{0,24}") {
        let body = s.as_bytes();
        prop_assert_eq!(code(body, DEFAULT_MAX_N), expected(body, DEFAULT_MAX_N));
    }
}
