//! Offsets handed over by the client must follow on from the last one processed.
//!
//! The relay's idempotent producer writes no control records and its topics are not compacted, so a
//! partition's offsets are contiguous, and a fetch that skips some is a broker fault. The chaos soak
//! caught tansu 0.6 answering a fetch that starts inside a record batch with the *next* batch, again and
//! again (seed 20261204: a group's fetches from offset 273 came back starting at 340 for four minutes,
//! while the other group had read 273–339; before the guard stopped it, a group committed past such a
//! block and lost it). So a gap is fetched again from the expected offset, then from further back (a
//! fetch that starts before the batch gets all of it; the inbox skips what was processed), and only a gap
//! still there stops the partition — or, with `--accept-offset-gaps` (compaction or transaction markers on
//! a topic someone else writes), is accepted at its second sighting. Every sighting is logged and counted.

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

/// What to do about a gap at `expected` seen `sightings` times in a row (1: the first time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapAction {
    /// Fetch again from `from` (at or before `expected`; records before it are re-read and skipped).
    Refetch {
        /// The offset to fetch from.
        from: i64,
    },
    /// Process past the gap (`--accept-offset-gaps`).
    Accept,
    /// Stop the partition at the gap; fetch again from `from` later.
    Stop {
        /// The offset to fetch from.
        from: i64,
    },
}

/// How far back the second and third fetches of a gap start: past the start of the record batch that
/// holds the expected offset (the relay's batches put at most a few thousand records in a partition's
/// batch), then further.
const STEP_BACK: [i64; 2] = [1_000, 10_000];

/// The escalation for a gap: fetch again from `expected`, then from [`STEP_BACK`] before it; then stop
/// (or accept, when gaps are accepted — at the second sighting, without stepping back).
pub fn on_gap(expected: i64, sightings: u32, accept: bool) -> GapAction {
    let back = |by: i64| (expected - by).max(0);
    match (sightings, accept) {
        (0 | 1, _) => GapAction::Refetch { from: expected },
        (_, true) => GapAction::Accept,
        (2, false) => GapAction::Refetch {
            from: back(STEP_BACK[0]),
        },
        (3, false) => GapAction::Refetch {
            from: back(STEP_BACK[1]),
        },
        (_, false) => GapAction::Stop {
            from: back(STEP_BACK[1]),
        },
    }
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
    fn a_gap_is_fetched_again_then_from_further_back_then_stops_or_is_accepted() {
        assert_eq!(on_gap(273, 1, false), GapAction::Refetch { from: 273 });
        assert_eq!(on_gap(273, 2, false), GapAction::Refetch { from: 0 });
        assert_eq!(on_gap(5273, 2, false), GapAction::Refetch { from: 4273 });
        assert_eq!(on_gap(15273, 3, false), GapAction::Refetch { from: 5273 });
        assert_eq!(on_gap(15273, 4, false), GapAction::Stop { from: 5273 });
        assert_eq!(on_gap(15273, 9, false), GapAction::Stop { from: 5273 });
        assert_eq!(on_gap(273, 1, true), GapAction::Refetch { from: 273 });
        assert_eq!(on_gap(273, 2, true), GapAction::Accept);
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
