//! What is queued, per upstream and priority, counted in memory (at start
//! from SQLite, then with every append, ack, eviction and expiry), so
//! depth, stats and the caps cost no scan.

use super::*;

/// The oldest row of one upstream and priority in a segment: an index seek.
fn oldest(table: &str) -> String {
    format!(
        "SELECT received_ms FROM {table} WHERE upstream = ?1 AND priority = ?2 \
         AND id NOT IN (SELECT id FROM gone) ORDER BY id LIMIT 1"
    )
}

impl Writer {
    /// Subtract a row that left the queue from the in-memory totals.
    pub(super) fn release(&mut self, upstream: &str, priority: Priority, size: u64) {
        self.count(upstream, priority, -1, -(size as i64));
    }

    /// Bytes queued for `upstream`, all priorities: what its cap is against.
    pub(super) fn used(&self, upstream: &str) -> u64 {
        self.counts
            .get(upstream)
            .map_or(0, |c| c.iter().map(|c| c.bytes).sum())
    }

    pub(super) fn uplink(&self, upstream: &str) -> Option<&Arc<UplinkMetrics>> {
        self.metrics.uplinks.get(upstream)
    }

    /// Events per upstream (committed and pending), from memory.
    pub(super) fn depth(&mut self) -> std::collections::BTreeMap<String, u64> {
        let mut out: std::collections::BTreeMap<String, u64> = self
            .settings
            .max_size
            .keys()
            .map(|k| (k.clone(), 0))
            .collect();
        for (upstream, c) in &self.counts {
            *out.entry(upstream.clone()).or_default() += c.iter().map(|c| c.events).sum::<u64>();
        }
        out
    }

    /// Per upstream and priority: events and bytes from memory, the oldest
    /// receive time by an index seek (or from pending rows).
    pub(super) fn stats(&mut self) -> Vec<crate::queue::Stats> {
        let mut out = Vec::new();
        let counts = self.counts.iter().flat_map(|(upstream, c)| {
            Priority::SEND_ORDER
                .into_iter()
                .map(move |p| (upstream, p, c[p.index()]))
        });
        for (upstream, priority, c) in counts {
            if c.events == 0 {
                continue;
            }
            // In the first segment that has a row of it.
            let committed: Option<i64> = self.tables.iter().find_map(|seg| {
                self.conn
                    .prepare_cached(&oldest(&seg.name))
                    .and_then(|mut st| {
                        st.query_row(params![upstream, priority.as_i64()], |r| r.get(0))
                    })
                    .ok()
            });
            let pending = self
                .rows
                .values()
                .filter(|h| *h.row.upstream == **upstream && h.row.priority == priority)
                .map(|h| h.row.received_ms)
                .min();
            let oldest = match (committed, pending) {
                (Some(c), Some(p)) => (c as u64).min(p),
                (Some(c), None) => c as u64,
                (None, Some(p)) => p,
                (None, None) => crate::event::now_ms(),
            };
            out.push(crate::queue::Stats {
                upstream: upstream.clone(),
                priority,
                events: c.events,
                bytes: c.bytes,
                oldest_ms: oldest,
            });
        }
        out.sort_by(|a, b| (&a.upstream, b.priority).cmp(&(&b.upstream, a.priority)));
        out
    }

    /// Adjust the in-memory count of one upstream and priority.
    pub(super) fn count(&mut self, upstream: &str, priority: Priority, events: i64, bytes: i64) {
        let counts = match self.counts.get_mut(upstream) {
            Some(c) => c,
            None => self.counts.entry(upstream.to_string()).or_default(),
        };
        let c = &mut counts[priority.index()];
        c.events = c.events.saturating_add_signed(events);
        c.bytes = c.bytes.saturating_add_signed(bytes);
    }
}

/// Events and bytes of one upstream and priority.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Count {
    pub(super) events: u64,
    pub(super) bytes: u64,
}
