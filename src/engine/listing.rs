//! The `flows` listing: in one reply, or in pages over a snapshot taken when the
//! listing starts, so a listing of 100 000 flows never sits whole in the daemon
//! (one reply of those is ~57 MB of JSON, and the buffer that builds it more).

use std::collections::HashMap;

use serde_json::value::RawValue;

use super::{raw_bytes, Engine, SeqOf};
use crate::api::filter::FlowFilter;
use crate::flows::Flow;
use crate::model::socket::FlowKey;

/// A paged listing in progress: what its first page saw.
pub(super) struct Listing {
    filter: FlowFilter,
    /// The cookies of the matching flows, sorted.
    cookies: Vec<u64>,
    /// The marker's per-flow packet and byte counts, read once: reading them walks
    /// the whole marker map.
    counts: HashMap<FlowKey, (u64, u64)>,
}

/// A struct, not json!(): json! would first build a Value of every flow, which
/// costs ten times the serialization itself.
#[derive(serde::Serialize)]
struct Flows<S> {
    flows: S,
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<Option<u64>>,
}

impl Engine {
    fn view_with<'a>(
        &'a self,
        counts: &'a HashMap<FlowKey, (u64, u64)>,
    ) -> impl Fn(&Flow) -> crate::api::view::FlowView + 'a {
        move |f: &Flow| self.flow_view(f, counts.get(&f.key).copied(), false)
    }

    /// Every matching flow in one reply (clients before paging). Each view is
    /// serialized as it is built, into a buffer sized for the reply.
    pub(super) fn all_flows(&self, filter: &FlowFilter) -> Result<Box<RawValue>, String> {
        let counts = self.maps.flow_counts().unwrap_or_default();
        let view = self.view_with(&counts);
        let flows = self.table.iter().map(view).filter(|v| filter.matches(v));
        let mut out = Vec::with_capacity(self.table.len() * 640 + 16);
        serde_json::to_writer(
            &mut out,
            &Flows {
                flows: SeqOf::new(flows),
                next: None,
            },
        )
        .map_err(|e| e.to_string())?;
        raw_bytes(out)
    }

    /// Up to `limit` flows with a cookie above `after`, in cookie order, and the
    /// cookie the next page starts after (`null` on the last page). A request
    /// without `after`, or with another filter, starts a new listing: its matching
    /// cookies and counts are kept until its last page, so each page costs its own
    /// flows only. Flows that start meanwhile wait for the next listing; those that
    /// end are skipped.
    pub(super) fn flows_page(
        &mut self,
        filter: FlowFilter,
        limit: usize,
        after: Option<u64>,
    ) -> Result<Box<RawValue>, String> {
        let mut listing = self
            .listing
            .take()
            .filter(|l| after.is_some() && l.filter == filter);
        if listing.is_none() {
            let counts = self.maps.flow_counts().unwrap_or_default();
            let mut cookies: Vec<u64> = {
                let view = self.view_with(&counts);
                self.table
                    .iter()
                    .filter(|f| filter.is_empty() || filter.matches(&view(f)))
                    .map(|f| f.cookie)
                    .collect()
            };
            cookies.sort_unstable();
            listing = Some(Listing {
                filter,
                cookies,
                counts,
            });
        }
        let l = listing.as_ref().expect("set above");
        let from = after.map_or(0, |a| l.cookies.partition_point(|c| *c <= a));
        let page = &l.cookies[from..l.cookies.len().min(from + limit)];
        let next = (from + limit < l.cookies.len())
            .then(|| page.last().copied())
            .flatten();
        let view = self.view_with(&l.counts);
        let flows = page.iter().filter_map(|c| self.table.get(*c)).map(view);
        let mut out = Vec::with_capacity(page.len() * 640 + 32);
        serde_json::to_writer(
            &mut out,
            &Flows {
                flows: SeqOf::new(flows),
                next: Some(next),
            },
        )
        .map_err(|e| e.to_string())?;
        // The last page ends the listing.
        self.listing = listing.filter(|_| next.is_some());
        raw_bytes(out)
    }
}
