//! Methods the CLI knows the shape of: their argument is checked before anything is sent, and
//! their reply after it comes back. A server that is not ours (a tutorial's, in any language)
//! may crash on an argument it cannot parse, or answer nonsense (`NaN`, an empty body); the CLI
//! must never send the first or print the second as a success.
//!
//! Methods the CLI does not know pass through untouched: their argument is the body as
//! given, any reply is printed, and they are retried only with `--idempotent`.

// The demo method's own parser, from the daemon's source: the CLI checks exactly what
// `amqp-rpcd` accepts (the rest of that module is the daemon's).
#[allow(dead_code)]
#[path = "../amqp-rpcd/fib.rs"]
mod fib;

/// What the CLI knows of one method.
pub struct Known {
    /// The method's name (the request's `type`).
    pub name: &'static str,
    /// What the argument must be, for the error message.
    pub takes: &'static str,
    /// Whether an argument is acceptable.
    pub arg_ok: fn(&str) -> bool,
    /// What a reply promises, for the error message.
    pub returns: &'static str,
    /// Whether a success reply has the promised shape.
    pub reply_ok: fn(&[u8]) -> bool,
    /// Safe to send twice (retried within the timeout unless `--no-retry`).
    pub idempotent: bool,
}

/// The methods the CLI knows.
const KNOWN: &[Known] = &[Known {
    name: "fib",
    takes: "a decimal integer n >= 0",
    arg_ok: |arg| fib::parse(arg.as_bytes(), u64::MAX).is_ok(),
    returns: "the decimal digits of fib(n)",
    reply_ok: |body| !body.is_empty() && body.iter().all(u8::is_ascii_digit),
    idempotent: true,
}];

/// What the CLI knows of `method`, if anything.
pub fn known(method: &str) -> Option<&'static Known> {
    KNOWN.iter().find(|k| k.name == method)
}

/// Check a call's argument before it is sent: the message says what the method takes.
pub fn check_arg(method: &str, arg: &str) -> Result<(), String> {
    match known(method) {
        Some(k) if !(k.arg_ok)(arg) => Err(format!("{} takes {}, not {arg:?}", k.name, k.takes)),
        _ => Ok(()),
    }
}

/// Check a success reply: the message says what came back instead of what was promised.
pub fn check_reply(method: &str, body: &[u8]) -> Result<(), String> {
    match known(method) {
        Some(k) if !(k.reply_ok)(body) => Err(format!(
            "the server's reply to {} is not {}: {:?}",
            k.name,
            k.returns,
            String::from_utf8_lossy(&body[..body.len().min(80)])
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fib_arguments_are_checked() {
        for ok in ["0", "30", " 100000 ", "99999999999"] {
            assert_eq!(check_arg("fib", ok), Ok(()), "{ok:?}");
        }
        for bad in [
            "abc",
            "",
            "-1",
            "1.5",
            "1e3",
            "+3",
            "3 4",
            "18446744073709551616",
        ] {
            assert!(check_arg("fib", bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            check_arg("echo", "anything"),
            Ok(()),
            "unknown methods pass"
        );
    }

    #[test]
    fn fib_replies_are_checked() {
        assert_eq!(check_reply("fib", b"832040"), Ok(()));
        for bad in [&b""[..], b"NaN", b"-1", b"55\n", b"None"] {
            assert!(check_reply("fib", bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_reply("echo", b""), Ok(()));
    }
}
