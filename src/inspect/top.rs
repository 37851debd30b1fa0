//! `--top N`: the first N flows in display order, chosen while the listing's pages
//! stream in. A sorted view must see every flow, but it need not keep them: a
//! bounded heap holds the N best so far and one page, so a door with a million
//! flows costs this process N flows of memory, not a million.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::columns::{display_order, Column};
use crate::api::client::{Client, ClientError};
use crate::api::filter::FlowFilter;
use crate::api::view::FlowView;

/// A flow ranked for the heap: "greater" means shown later, so the heap's top is
/// the flow to drop first.
struct Ranked {
    flow: FlowView,
    column: Column,
    descending: bool,
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        display_order(self.column, self.descending, &self.flow, &other.flow)
    }
}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Ranked {}

/// The `n` first flows seen so far, in display order.
pub struct Top {
    n: usize,
    column: Column,
    descending: bool,
    heap: BinaryHeap<Ranked>,
    /// Flows offered, kept or not.
    pub seen: usize,
}

impl Top {
    pub fn new(n: usize, column: Column, descending: bool) -> Self {
        Top {
            n,
            column,
            descending,
            heap: BinaryHeap::with_capacity(n.saturating_add(1).min(1 << 16)),
            seen: 0,
        }
    }

    pub fn offer(&mut self, flow: FlowView) {
        self.seen += 1;
        if self.n == 0 {
            return;
        }
        let r = Ranked {
            flow,
            column: self.column,
            descending: self.descending,
        };
        if self.heap.len() < self.n {
            self.heap.push(r);
        } else if let Some(mut worst) = self.heap.peek_mut() {
            if r < *worst {
                *worst = r;
            }
        }
    }

    /// The kept flows, first shown first.
    pub fn into_sorted(self) -> Vec<FlowView> {
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|r| r.flow)
            .collect()
    }
}

/// The first `n` flows matching `filter` by `column`, fetched page by page.
pub fn top_flows(
    client: &Client,
    filter: &FlowFilter,
    column: Column,
    descending: bool,
    n: usize,
) -> Result<Vec<FlowView>, ClientError> {
    let mut top = Top::new(n, column, descending);
    client.flow_pages(filter, |page| {
        // Filtered again, as for a whole listing: an older daemon may ignore it.
        for f in page.into_iter().filter(|f| filter.matches(f)) {
            top.offer(f);
        }
        Ok(())
    })?;
    Ok(top.into_sorted())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::columns::sorted_indices;

    fn flow(cookie: u64, bytes: u64, age: f64) -> FlowView {
        FlowView {
            bytes,
            age_secs: age,
            ..crate::api::view::tests::flow(cookie)
        }
    }

    /// The same rows as sorting everything and cutting, for every column's kind of
    /// order, ties included, in both directions.
    #[test]
    fn keeps_what_a_full_sort_would_show_first() {
        let flows: Vec<FlowView> = (0..500u64)
            .map(|i| {
                flow(
                    1000 + (i * 7919) % 500,
                    (i * 31) % 17,
                    ((i * 13) % 11) as f64,
                )
            })
            .collect();
        for column in [Column::Bytes, Column::Age, Column::Local] {
            for descending in [true, false] {
                for n in [0, 1, 10, 499, 500, 800] {
                    let mut top = Top::new(n, column, descending);
                    for f in &flows {
                        top.offer(f.clone());
                    }
                    assert_eq!(top.seen, 500);
                    let got: Vec<u64> = top.into_sorted().iter().map(|f| f.cookie).collect();
                    let want: Vec<u64> = sorted_indices(&flows, |_| true, column, descending)
                        .into_iter()
                        .take(n)
                        .map(|i| flows[i].cookie)
                        .collect();
                    assert_eq!(got, want, "{column:?} descending={descending} n={n}");
                }
            }
        }
    }
}
