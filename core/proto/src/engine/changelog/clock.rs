//! Vector clocks over the log's actors, and what they answer: which changes
//! are ancestors of a set of heads, and which come after it. Owns the clock
//! types and helpers and the two clock caches (per change and per head set).

use automerge::ChangeHash;

use super::{ChangeLog, FastMap, FastSet};

/// A vector clock: (actor index, highest sequence number), sorted by actor.
pub(super) type Clock = Vec<(u32, u32)>;

/// How many clocks of whole head sets are remembered.
pub(super) const SET_CLOCKS: usize = 16;

/// Most clocks kept in the cache before it is trimmed to recent changes.
pub(super) const CLOCK_CACHE_MAX: usize = 8192;
/// How many of the most recent changes keep their clocks when trimming.
const CLOCK_CACHE_RECENT: usize = 2048;

impl ChangeLog {
    /// The clock of one change: the merge of its dependencies' clocks plus
    /// itself. Computed without recursion; cached.
    pub(super) fn clock_of(&self, idx: u32) -> Clock {
        if let Some(c) = self.clocks.borrow().get(&idx) {
            return c.clone();
        }
        let mut local: FastMap<u32, Clock> = self.new_map();
        let mut stack = vec![idx];
        while let Some(&top) = stack.last() {
            if local.contains_key(&top) {
                stack.pop();
                continue;
            }
            let entry = self.entries[top as usize];
            let cache = self.clocks.borrow();
            let missing: Vec<u32> = self
                .entry_deps(&entry)
                .iter()
                .copied()
                .filter(|d| !local.contains_key(d) && !cache.contains_key(d))
                .collect();
            if !missing.is_empty() {
                drop(cache);
                stack.extend(missing);
                continue;
            }
            let mut clock = Clock::new();
            for d in self.entry_deps(&entry) {
                let dep = local.get(d).or_else(|| cache.get(d)).expect("computed");
                merge_into(&mut clock, dep);
            }
            drop(cache);
            include(&mut clock, entry.actor, entry.seq);
            local.insert(top, clock);
            stack.pop();
        }
        let clock = local.remove(&idx).expect("computed");
        self.remember_clock(idx, clock.clone());
        clock
    }

    pub(super) fn remember_clock(&self, idx: u32, clock: Clock) {
        let mut cache = self.clocks.borrow_mut();
        if cache.len() >= CLOCK_CACHE_MAX {
            let keep_from = (self.entries.len().saturating_sub(CLOCK_CACHE_RECENT)) as u32;
            let mut heads: FastSet<u32> = self.new_set();
            heads.extend(self.heads.iter().filter_map(|h| self.index.get(h).copied()));
            cache.retain(|i, _| *i >= keep_from || heads.contains(i));
        }
        cache.insert(idx, clock);
    }

    /// The clock of a set of changes (unknown hashes are ignored).
    pub(super) fn clock_of_set(&self, hashes: &[ChangeHash]) -> Clock {
        if let [one] = hashes {
            return self
                .index
                .get(one)
                .map_or_else(Clock::new, |&i| self.clock_of(i));
        }
        {
            let mut memo = self.set_clocks.borrow_mut();
            if let Some(at) = memo.iter().position(|(k, _)| k.as_slice() == hashes) {
                let hit = memo.remove(at);
                let clock = hit.1.clone();
                memo.insert(0, hit);
                return clock;
            }
        }
        let mut all_known = true;
        let clock = if hashes.len() <= 4 {
            let mut clock = Clock::new();
            for h in hashes {
                match self.index.get(h) {
                    Some(&idx) => merge_into(&mut clock, &self.clock_of(idx)),
                    None => all_known = false,
                }
            }
            clock
        } else {
            // Many heads (many concurrent writers): take the maximum per
            // actor in a dense table rather than merging clock after clock.
            let mut dense = vec![0u32; self.by_actor.len()];
            for h in hashes {
                match self.index.get(h) {
                    Some(&idx) => {
                        for (actor, seq) in self.clock_of(idx) {
                            let slot = &mut dense[actor as usize];
                            *slot = (*slot).max(seq);
                        }
                    }
                    None => all_known = false,
                }
            }
            dense
                .into_iter()
                .enumerate()
                .filter(|&(_, seq)| seq > 0)
                .map(|(actor, seq)| (actor as u32, seq))
                .collect()
        };
        // A set naming changes we do not hold yet would get a different
        // clock once they arrive: only complete sets are remembered.
        if !all_known {
            return clock;
        }
        let mut memo = self.set_clocks.borrow_mut();
        memo.truncate(SET_CLOCKS - 1);
        memo.insert(0, (hashes.to_vec(), clock.clone()));
        clock
    }

    /// Log indexes of every change that is not an ancestor of `heads` (or
    /// one of them), in causal order. All of them for no heads.
    pub(super) fn indexes_after(&self, heads: &[ChangeHash]) -> Vec<u32> {
        if heads.is_empty() {
            return (0..self.entries.len() as u32).collect();
        }
        let clock = self.clock_of_set(heads);
        let mut out = Vec::new();
        for (actor, changes) in self.by_actor.iter().enumerate() {
            let known = clock_get(&clock, actor as u32) as usize;
            out.extend_from_slice(changes.get(known..).unwrap_or(&[]));
        }
        out.sort_unstable();
        out
    }

    /// Whether change `idx` is covered by `clock` (one of, or an ancestor
    /// of, the changes the clock was taken of).
    pub(super) fn within(&self, idx: u32, clock: &Clock) -> bool {
        let e = &self.entries[idx as usize];
        e.seq <= clock_get(clock, e.actor)
    }
}

pub(super) fn clock_get(clock: &Clock, actor: u32) -> u32 {
    clock
        .binary_search_by_key(&actor, |&(a, _)| a)
        .map_or(0, |i| clock[i].1)
}

pub(super) fn include(clock: &mut Clock, actor: u32, seq: u32) {
    match clock.binary_search_by_key(&actor, |&(a, _)| a) {
        Ok(i) => clock[i].1 = clock[i].1.max(seq),
        Err(i) => clock.insert(i, (actor, seq)),
    }
}

/// Entry-wise maximum of two clocks, in one pass over both (they are
/// sorted by actor).
pub(super) fn merge_into(into: &mut Clock, other: &Clock) {
    if into.is_empty() {
        into.clone_from(other);
        return;
    }
    if other.is_empty() {
        return;
    }
    let mut merged = Clock::with_capacity(into.len().max(other.len()));
    let (mut a, mut b) = (into.iter().peekable(), other.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (Some(&&(x, sx)), Some(&&(y, sy))) => {
                if x == y {
                    merged.push((x, sx.max(sy)));
                    a.next();
                    b.next();
                } else if x < y {
                    merged.push((x, sx));
                    a.next();
                } else {
                    merged.push((y, sy));
                    b.next();
                }
            }
            (Some(&&e), None) => {
                merged.push(e);
                a.next();
            }
            (None, Some(&&e)) => {
                merged.push(e);
                b.next();
            }
            (None, None) => break,
        }
    }
    *into = merged;
}
