//! Offsets handed over by the client must follow on from the last one processed.
//!
//! The relay's idempotent producer writes no control records and its topics are not compacted, so a
//! partition's offsets are contiguous, and a fetch that skips some is a broker fault (the chaos soak saw
//! tansu 0.6 serve one group a whole record batch short after a restart of its connections: the group
//! committed past records it never received). A gap is therefore fetched once more from the expected
//! offset; only a gap that is there again is accepted (compaction or transaction markers on a topic
//! someone else writes), and both are logged and counted.

/// Whether a run of one partition's offsets follows on from `expected` (the offset after the last one
/// processed; `None` when nothing was processed since the assignment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continuity {
    /// No gap.
    Contiguous,
    /// `offsets[index]` is `found` where `expected` was due.
    GapAt {
        /// Index of the first record after the gap.
        index: usize,
        /// The offset that should have come.
        expected: i64,
        /// The offset that came.
        found: i64,
    },
}

/// Finds the first gap in `offsets` (ascending) after `expected`. An offset below `expected` (a rewind
/// the runtime asked for) is not a gap.
pub fn check(expected: Option<i64>, offsets: &[i64]) -> Continuity {
    let mut next = expected;
    for (index, &found) in offsets.iter().enumerate() {
        if let Some(expected) = next {
            if found > expected {
                return Continuity::GapAt {
                    index,
                    expected,
                    found,
                };
            }
        }
        next = Some(found + 1);
    }
    Continuity::Contiguous
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_runs_and_rewinds_pass() {
        assert_eq!(check(None, &[7, 8, 9]), Continuity::Contiguous);
        assert_eq!(check(Some(7), &[7, 8, 9]), Continuity::Contiguous);
        assert_eq!(check(Some(9), &[4, 5]), Continuity::Contiguous, "a rewind");
        assert_eq!(check(Some(3), &[]), Continuity::Contiguous);
    }

    #[test]
    fn a_skipped_block_is_found_at_its_first_record() {
        assert_eq!(
            check(Some(5189), &[5232, 5233]),
            Continuity::GapAt {
                index: 0,
                expected: 5189,
                found: 5232
            }
        );
        assert_eq!(
            check(None, &[10, 11, 15]),
            Continuity::GapAt {
                index: 2,
                expected: 12,
                found: 15
            }
        );
    }
}
