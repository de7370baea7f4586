//! Recognising the one event an upstream cannot take.
//!
//! One row the upstream cannot take would otherwise block its queue for
//! good: an upstream that drops the connection on it (Mosquitto on a topic
//! it calls malformed, a cloud broker's policy) gets it first again after
//! every reconnect. A session that ends with rows on the wire and nothing
//! acknowledged strikes the oldest of them; `POISON_AFTER` strikes in a row
//! on the same row, and it goes. Any acknowledgement clears the count.

/// Sessions in a row that may end with the same row first in flight and
/// nothing acknowledged before that row is dead-lettered.
pub(super) const POISON_AFTER: u32 = 3;

/// The row under suspicion and its strikes so far.
#[derive(Debug, Default)]
pub(super) struct Suspect {
    row: Option<i64>,
    strikes: u32,
}

/// What a session's end says about its oldest unacknowledged row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Strike {
    /// It acknowledged something: the upstream takes our events.
    Cleared,
    /// Lost with rows on the wire and nothing acknowledged: the oldest.
    Against(i64),
    /// No session, or nothing was on the wire: says nothing.
    Unchanged,
}

impl Suspect {
    /// A session ended. `Some(row)` when that row is to be dead-lettered.
    pub(super) fn strike(&mut self, strike: Strike) -> Option<i64> {
        let head = match strike {
            Strike::Cleared => {
                *self = Suspect::default();
                return None;
            }
            Strike::Unchanged => return None,
            Strike::Against(row) => row,
        };
        if self.row == Some(head) {
            self.strikes += 1;
        } else {
            *self = Suspect {
                row: Some(head),
                strikes: 1,
            };
        }
        if self.strikes >= POISON_AFTER {
            *self = Suspect::default();
            return Some(head);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_first_in_flight_at_three_fruitless_sessions_in_a_row_is_dead_lettered() {
        let mut s = Suspect::default();
        assert_eq!(s.strike(Strike::Against(7)), None);
        assert_eq!(
            s.strike(Strike::Unchanged),
            None,
            "a failed connect says nothing"
        );
        assert_eq!(s.strike(Strike::Against(7)), None);
        assert_eq!(s.strike(Strike::Against(7)), Some(7));
        // Counting starts again; another row, or an ack, resets it.
        assert_eq!(s.strike(Strike::Against(8)), None);
        assert_eq!(s.strike(Strike::Against(9)), None);
        assert_eq!(s.strike(Strike::Against(9)), None);
        assert_eq!(s.strike(Strike::Cleared), None);
        assert_eq!(s.strike(Strike::Against(9)), None);
        assert_eq!(s.strike(Strike::Against(9)), None);
        assert_eq!(s.strike(Strike::Against(9)), Some(9));
    }
}
