//! The `fib` method: the body is a decimal `n`, the reply is the exact decimal digits of the
//! n-th Fibonacci number (`fib(0) = 0`, `fib(1) = 1`).
//!
//! Values up to `fib(186)` fit in a `u128` and are summed directly. Beyond that we use fast
//! doubling on big integers: it needs O(log n) multiplications instead of O(n) additions of
//! ever-growing numbers, so `fib(100_000)` (20 899 digits) takes under a millisecond in release
//! mode, where the plain iterative sum takes about 20 ms.
//!
//! Parsing is strict and bounded before any work starts: whatever a client sends, the daemon
//! either answers with a contract error or does at most `fib(max_n)` worth of work.

//!
//! The module is the binary's, not the library's: the framework knows nothing of fib. The
//! test suite includes this same file (`tests/common`, `tests/fib.rs`), so it uses only the
//! library's public API.

use amqp_rpc::protocol::{ErrorCode, RequestError};
use amqp_rpc::service::{Method, Methods, Work};
use num_bigint::BigUint;
use serde::Deserialize;

/// The config section of the demo method: `[fib]`, `AMQP_RPC__FIB__MAX_N`.
pub const SECTION: &str = "fib";

/// Largest `max_n` the config accepts: fib(10^7) has about 2 million digits.
pub const MAX_MAX_N: u64 = 10_000_000;

/// `[fib]`: the demo method's own settings.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FibConfig {
    /// Largest `n` answered; a larger one is `out_of_range`.
    pub max_n: u64,
}

impl Default for FibConfig {
    fn default() -> Self {
        FibConfig {
            max_n: DEFAULT_MAX_N,
        }
    }
}

impl FibConfig {
    /// Semantic checks on top of the types, as the daemon's own config has.
    pub fn validate(&self) -> Result<(), String> {
        match self.max_n {
            n if n > MAX_MAX_N => Err(format!(
                "fib.max_n: at most {MAX_MAX_N} (fib of that has ~2 million digits)"
            )),
            _ => Ok(()),
        }
    }

    /// What `amqp-rpcd` serves: `fib`, also the default method, so the tutorial's requests
    /// (which carry no `type`) reach it.
    pub fn methods(&self) -> Methods {
        Methods::default()
            .with(Fib::new(self.max_n))
            .default_method("fib")
    }
}

/// Default bound on `n`; `fib(100_000)` is about 21 kB of digits.
pub const DEFAULT_MAX_N: u64 = 100_000;

/// Largest `n` answered on the reactor: `fib(1500)` (314 digits) takes about 2 µs in release
/// mode, less than the hand-off to the blocking pool would cost.
pub const INLINE_MAX_N: u64 = 1500;

/// Largest `n` whose Fibonacci number fits in a `u128`.
const U128_MAX_N: u64 = 186;

/// How much of an invalid body is echoed back, so a huge body cannot bloat the error reply.
const QUOTE_CHARS: usize = 32;
/// How many digits of an out-of-range number are echoed back.
const QUOTE_DIGITS: usize = 24;

/// The whitespace the contract allows around `n`. `u8::is_ascii_whitespace` is not used
/// because it leaves out vertical tab, which the contract includes.
pub fn is_contract_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n' | '\x0b' | '\x0c')
}

/// Parse a `fib` request body into `n`, enforcing `0 <= n <= max_n`.
pub fn parse(body: &[u8], max_n: u64) -> Result<u64, RequestError> {
    let invalid = |message: String| RequestError::new(ErrorCode::InvalidArgument, message);
    let text = std::str::from_utf8(body).map_err(|e| {
        let at = e.valid_up_to();
        invalid(format!(
            "body is not UTF-8 (bad byte at offset {at}): expected a decimal integer n"
        ))
    })?;
    let text = text.trim_matches(is_contract_space);
    if text.is_empty() {
        return Err(invalid("empty body: expected a decimal integer n".into()));
    }
    // Checked before `str::parse`, which would also accept a leading `+`.
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        let cut = text
            .char_indices()
            .nth(QUOTE_CHARS)
            .map_or(text.len(), |(i, _)| i);
        let more = if cut < text.len() { "..." } else { "" };
        let quoted = &text[..cut];
        return Err(invalid(format!(
            "invalid argument {quoted:?}{more}: expected a decimal integer 0..={max_n}"
        )));
    }
    // Overflow is just another way of being out of range (and `parse` gives up at the first
    // overflowing digit rather than converting the whole number).
    match text.parse::<u64>() {
        Ok(n) if n <= max_n => Ok(n),
        _ => {
            // Never empty here: an all-zero body is 0, which is always in range.
            let digits = text.trim_start_matches('0');
            let shown = match digits.get(..QUOTE_DIGITS) {
                Some(head) if head.len() < digits.len() => format!("{head}..."),
                _ => digits.to_owned(),
            };
            Err(RequestError::new(
                ErrorCode::OutOfRange,
                format!("n = {shown} is out of range: must be 0 <= n <= {max_n}"),
            ))
        }
    }
}

/// The exact decimal digits of `fib(n)`.
pub fn fib_decimal(n: u64) -> String {
    if n <= U128_MAX_N {
        // Stop at b = F(n) rather than a = F(n): F(187) would overflow.
        let (mut a, mut b) = (0u128, 1u128);
        for _ in 1..n {
            (a, b) = (b, a + b);
        }
        return if n == 0 { a } else { b }.to_string();
    }

    // Invariant: (a, b) = (F(k), F(k + 1)), where k is the prefix of n's bits read so far.
    let mut a = BigUint::ZERO;
    let mut b = BigUint::from(1u32);
    let top = u64::BITS - n.leading_zeros();
    for i in (1..top).rev() {
        let f2k = double(&a, &b);
        // F(2k + 1) = F(k)^2 + F(k+1)^2, built in place of F(k), which is no longer needed.
        a = &a * &a;
        a += &b * &b;
        if (n >> i) & 1 == 1 {
            b = f2k;
            b += &a;
        } else {
            b = std::mem::replace(&mut a, f2k);
        }
    }
    // The last step needs only one of F(2k), F(2k + 1): skip the other's multiplications.
    let last = if n & 1 == 0 {
        double(&a, &b)
    } else {
        &a * &a + &b * &b
    };
    last.to_string()
}

/// F(2k) = F(k) * (2F(k+1) - F(k)); never negative since F(k+1) >= F(k).
fn double(fk: &BigUint, fk1: &BigUint) -> BigUint {
    let mut r = fk1 << 1u32;
    r -= fk;
    r *= fk;
    r
}

/// The `fib` RPC method, bounded by `max_n`.
#[derive(Debug, Clone)]
pub struct Fib {
    max_n: u64,
}

impl Fib {
    /// A `fib` method refusing `n > max_n` with `out_of_range`.
    pub fn new(max_n: u64) -> Self {
        Fib { max_n }
    }
}

impl Method for Fib {
    fn name(&self) -> &str {
        "fib"
    }

    fn prepare(&self, body: &[u8]) -> Result<Work, RequestError> {
        let n = parse(body, self.max_n)?;
        if n <= INLINE_MAX_N {
            Ok(Work::Done(fib_decimal(n).into_bytes()))
        } else {
            Ok(Work::Heavy(Box::new(move || {
                Ok(fib_decimal(n).into_bytes())
            })))
        }
    }
}
