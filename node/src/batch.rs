//! Positional batches: "validate each item, call on the valid ones, put their results back in place".
//!
//! Every batch API (GetMany, PutMany, DeleteMany, and their peer-side twins) answers one result per item, in
//! request order, while only some items reach the next step (the others failed validation, or are grouped by
//! owner). [`Batch`] keeps the slots; a slot that nobody filled is an INTERNAL error, never a success, so a
//! bug that drops a result is visible to the caller instead of turning into a silent OK.

use crate::{error::EngineError, peer::KeyResults};

/// The per-item results of a batch under construction.
#[derive(Debug)]
pub struct Batch<T> {
    slots: Vec<Option<Result<T, EngineError>>>,
}

impl<T> Batch<T> {
    /// A batch of `len` items, none answered yet.
    pub fn new(len: usize) -> Self {
        Self { slots: std::iter::repeat_with(|| None).take(len).collect() }
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True for a batch of no items.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Parses every item: an item that fails answers with its error at once; the others are returned with
    /// their positions, in order, for the next step.
    pub fn split<I, V>(
        &mut self,
        items: impl IntoIterator<Item = I>,
        mut parse: impl FnMut(I) -> Result<V, EngineError>,
    ) -> Vec<(usize, V)> {
        let mut valid = Vec::with_capacity(self.slots.len());
        for (i, item) in items.into_iter().enumerate() {
            match parse(item) {
                Ok(v) => valid.push((i, v)),
                Err(e) => self.set(i, Err(e)),
            }
        }
        valid
    }

    /// Answers the item at `position` (an out-of-range position is ignored: it names no item).
    pub fn set(&mut self, position: usize, result: Result<T, EngineError>) {
        if let Some(slot) = self.slots.get_mut(position) {
            *slot = Some(result);
        }
    }

    /// Answers the items at `positions` with `results`, pairwise. When the step returned fewer results than
    /// it was given items, the items left over stay unanswered (and become INTERNAL in [`Batch::finish`]).
    pub fn fill(&mut self, positions: impl IntoIterator<Item = usize>, results: KeyResults<T>) {
        for (i, r) in positions.into_iter().zip(results) {
            self.set(i, r);
        }
    }

    /// True when the item at `position` has been answered.
    pub fn is_answered(&self, position: usize) -> bool {
        self.slots.get(position).is_some_and(Option::is_some)
    }

    /// The results in item order. An item nobody answered is an INTERNAL error.
    pub fn finish(self) -> KeyResults<T> {
        self.slots
            .into_iter()
            .enumerate()
            .map(|(i, slot)| {
                slot.unwrap_or_else(|| {
                    Err(EngineError::Internal(format!("no result was computed for item {i} of the batch")))
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;

    #[test]
    fn results_go_back_to_their_positions() {
        let mut batch = Batch::<u32>::new(4);
        let valid = batch.split(["a", "", "c", "d"], |k| {
            if k.is_empty() { Err(EngineError::InvalidArgument("empty".into())) } else { Ok(k) }
        });
        assert_eq!(valid, vec![(0, "a"), (2, "c"), (3, "d")]);
        batch.fill(valid.iter().map(|(i, _)| *i), vec![Ok(1), Ok(3), Err(EngineError::NotFound)]);
        assert_eq!(
            batch.finish(),
            vec![Ok(1), Err(EngineError::InvalidArgument("empty".into())), Ok(3), Err(EngineError::NotFound)]
        );
    }

    #[test]
    fn a_missing_result_is_internal_never_ok() {
        let mut batch = Batch::<()>::new(3);
        // The step answered only two of three items.
        batch.fill([0, 1, 2], vec![Ok(()), Ok(())]);
        let results = batch.finish();
        assert_eq!(results[..2], [Ok(()), Ok(())]);
        let err = results[2].clone().expect_err("an unanswered item must fail");
        assert_eq!(err.code(), Code::Internal);
    }
}
