//! Call identifiers: one random prefix per client and a counter, so ids are unique across
//! clients (the server's reply cache keys on `message_id`) without a random draw per call.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
pub(crate) struct Ids {
    prefix: String,
    next: AtomicU64,
}

impl Ids {
    pub fn new() -> Self {
        Ids {
            prefix: uuid::Uuid::new_v4().simple().to_string(),
            next: AtomicU64::new(0),
        }
    }

    /// A fresh id: `{128-bit random prefix}-{counter}`.
    pub fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n:x}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_within_and_across_clients() {
        let (a, b) = (Ids::new(), Ids::new());
        let ids: std::collections::HashSet<String> =
            (0..1000).flat_map(|_| [a.next(), b.next()]).collect();
        assert_eq!(ids.len(), 2000);
    }
}
