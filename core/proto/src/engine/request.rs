//! Finding documents we lack: asking peers, deciding when a document is
//! unavailable, and telling peers who asked.
//!
//! The decisions live in two small machines with no access to the engine:
//! [`PeerAsk`], what one peer said about one document and whether we asked
//! it, and [`Request`], one document's round of asking (who waits for it,
//! the deadline, the grace period, the one extension). The engine methods
//! at the end feed them what they need (which peers are connected, whether
//! one has offered heads) and carry out what they decide.

use std::time::Duration;

use super::*;

/// One peer's part in finding one document.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct PeerAsk {
    /// It told us (by `request` or `doc-unavailable`) it lacks the document.
    lacks: bool,
    /// It sent `request`: tell it if the document turns out unavailable.
    they_requested: bool,
    /// We told it `doc-unavailable` since its last `request`.
    told_unavailable: bool,
    /// We sent it `request` in the current round.
    we_requested: bool,
}

impl PeerAsk {
    /// It sent `request`: it lacks the document and waits for an answer.
    pub(super) fn on_request(&mut self) {
        self.they_requested = true;
        self.told_unavailable = false;
        self.lacks = true;
    }

    /// It sent a sync message with heads: it has the document.
    pub(super) fn on_offer(&mut self) {
        self.lacks = false;
    }

    /// It answered `doc-unavailable`.
    pub(super) fn on_unavailable(&mut self) {
        self.lacks = true;
    }

    /// It said it lacks the document.
    pub(super) fn lacks(&self) -> bool {
        self.lacks
    }

    /// Whether to send it our `request` now: only while a round is on
    /// (`requesting`), once per round, and not after it said it lacks the
    /// document. Saying yes records that we asked.
    pub(super) fn ask(&mut self, requesting: bool) -> bool {
        if !requesting || self.lacks || self.we_requested {
            return false;
        }
        self.we_requested = true;
        true
    }

    /// We asked it this round and it has not said no.
    fn awaited(&self) -> bool {
        self.we_requested && !self.lacks
    }

    /// The document is unavailable: whether to tell this peer so (it asked
    /// and has not been told). Saying yes records that it was told.
    fn tell_unavailable(&mut self) -> bool {
        if self.they_requested && !self.told_unavailable {
            self.told_unavailable = true;
            return true;
        }
        false
    }
}

/// A round of asking peers, while the document is `Requesting`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Round {
    deadline: Timestamp,
    /// Until then, "nobody has it" is not yet an answer (see
    /// [`EngineConfig::unavailable_grace`]).
    grace_until: Option<Timestamp>,
    /// The deadline was extended once already.
    extended: bool,
}

/// One document's request machine: who wants it, and the current round.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Request {
    /// A local `find` or `create` wants this document (so keep asking new
    /// peers for it while we lack it).
    wanted: bool,
    /// `find` commands waiting for the document to be found or not.
    waiting: Vec<CommandId>,
    round: Option<Round>,
}

/// How a round starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Begin {
    /// Nobody to ask and no grace period: unavailable at once.
    Unavailable,
    /// Asking; decide at this deadline at the latest.
    Until(Timestamp),
}

/// What a request timer decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expiry {
    /// The timer belongs to a round that is over or was moved.
    Stale,
    /// A peer is still answering: one more full timeout, until then.
    Extended(Timestamp),
    /// Give up: the document is unavailable.
    Unavailable,
}

impl Request {
    /// A local command wants the document.
    pub(super) fn want(&mut self) {
        self.wanted = true;
    }

    /// Whether a local command ever wanted the document.
    pub(super) fn wanted(&self) -> bool {
        self.wanted
    }

    /// A `find` waits for the outcome.
    pub(super) fn wait(&mut self, cmd: CommandId) {
        self.waiting.push(cmd);
    }

    /// Some `find` waits for the outcome.
    pub(super) fn has_waiters(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Nothing local wants the document: it may be evicted.
    pub(super) fn is_idle(&self) -> bool {
        !self.wanted && self.waiting.is_empty()
    }

    /// What survives reloading the document: who wants it, not the round.
    pub(super) fn interest(&self) -> Self {
        Self {
            wanted: self.wanted,
            waiting: self.waiting.clone(),
            round: None,
        }
    }

    /// Starts a round, forgetting whom we asked in the last one.
    /// `anyone` says whether there is a peer to ask or one that has offered
    /// the document; without one we still wait out `grace` before saying
    /// "unavailable", since the peer that has it may be about to offer it (a
    /// client that just created a document announces it in the same instant
    /// another asks for it).
    pub(super) fn begin<'a>(
        &mut self,
        now: Timestamp,
        anyone: bool,
        timeout: Duration,
        grace: Duration,
        peers: impl Iterator<Item = &'a mut PeerAsk>,
    ) -> Begin {
        if !anyone && grace.is_zero() {
            return Begin::Unavailable;
        }
        let deadline = now.plus(if anyone { timeout } else { grace });
        self.round = Some(Round {
            deadline,
            grace_until: (!anyone).then_some(deadline),
            extended: false,
        });
        for ask in peers {
            ask.we_requested = false;
        }
        Begin::Until(deadline)
    }

    /// Whether the round can end now as "unavailable": past the grace
    /// period, no connected peer we asked still owes an answer
    /// (`awaiting`, see [`Request::awaiting`]), and nobody has offered the
    /// document.
    pub(super) fn all_said_no(&self, now: Timestamp, awaiting: bool, someone_has_it: bool) -> bool {
        if self
            .round
            .is_some_and(|r| r.grace_until.is_some_and(|g| now < g))
        {
            return false;
        }
        !someone_has_it && !awaiting
    }

    /// Some connected peer we asked has not answered no.
    pub(super) fn awaiting<'a>(mut peers: impl Iterator<Item = (&'a PeerAsk, bool)>) -> bool {
        peers.any(|(ask, connected)| connected && ask.awaited())
    }

    /// The round's timer fired for deadline `at`. `answering` says whether
    /// a peer we asked still owes an answer or one has offered the
    /// document: then the round gets one more full `timeout`, once only,
    /// so a peer that claims the document and never sends it cannot hold
    /// us forever.
    pub(super) fn on_deadline(
        &mut self,
        at: Timestamp,
        now: Timestamp,
        timeout: Duration,
        answering: bool,
    ) -> Expiry {
        let Some(round) = self.round.as_mut() else {
            return Expiry::Stale;
        };
        if round.deadline != at {
            return Expiry::Stale;
        }
        if answering && !round.extended {
            round.deadline = now.plus(timeout);
            round.grace_until = None;
            round.extended = true;
            return Expiry::Extended(round.deadline);
        }
        Expiry::Unavailable
    }

    /// The round is over (found, unavailable, or the document failed to
    /// load): the waiting commands are to be answered.
    pub(super) fn finish(&mut self) -> Vec<CommandId> {
        self.round = None;
        std::mem::take(&mut self.waiting)
    }

    /// The document is unavailable: ends the round and says which peers
    /// to tell (those that asked and were not told yet).
    pub(super) fn unavailable<'a>(
        &mut self,
        peers: impl Iterator<Item = (&'a PeerId, &'a mut PeerAsk)>,
    ) -> (Vec<CommandId>, Vec<PeerId>) {
        let tell = peers
            .filter_map(|(peer, ask)| ask.tell_unavailable().then(|| peer.clone()))
            .collect();
        (self.finish(), tell)
    }
}

impl Engine {
    /// Asks every peer we may ask for a document we lack; if there is
    /// nobody to ask, it is unavailable now (or after the grace period).
    pub(super) fn begin_request(&mut self, id: &DocumentId) {
        let candidates: Vec<PeerId> = self
            .peers
            .keys()
            .filter(|p| {
                self.cfg.policy.announce(p, id)
                    && !self
                        .docs
                        .get(id)
                        .and_then(|d| d.peers.get(*p))
                        .is_some_and(|dp| dp.ask.lacks())
            })
            .cloned()
            .collect();
        let anyone = !candidates.is_empty() || self.someone_has_it(id);
        let Some(doc) = self.docs.get_mut(id) else {
            return;
        };
        let begin = doc.request.begin(
            self.now,
            anyone,
            self.cfg.request_timeout,
            self.cfg.unavailable_grace,
            doc.peers.values_mut().map(|dp| &mut dp.ask),
        );
        let deadline = match begin {
            Begin::Unavailable => return self.mark_unavailable(id),
            Begin::Until(deadline) => deadline,
        };
        doc.status = DocStatus::Requesting;
        self.timers.insert((deadline, Timer::Request(id.clone())));
        for peer in candidates {
            self.sync_peer(id, &peer);
        }
        self.check_request_done(id);
    }

    /// For a document being requested: whether a connected peer we asked
    /// still owes an answer, and whether one has offered the document.
    fn answers(&self, id: &DocumentId) -> Option<(bool, bool)> {
        let doc = self.docs.get(id)?;
        if doc.status != DocStatus::Requesting {
            return None;
        }
        let connected = |p: &PeerId| self.peers.contains_key(p);
        let peers = doc.peers.iter().map(|(p, dp)| (&dp.ask, connected(p)));
        Some((Request::awaiting(peers), doc.someone_has_it(connected)))
    }

    /// While requesting: if every peer we asked has said no (or left),
    /// the document is unavailable.
    pub(super) fn check_request_done(&mut self, id: &DocumentId) {
        let Some((awaiting, has_it)) = self.answers(id) else {
            return;
        };
        let all_said_no = self
            .docs
            .get(id)
            .is_some_and(|d| d.request.all_said_no(self.now, awaiting, has_it));
        if all_said_no {
            self.mark_unavailable(id);
        }
    }

    /// A request timer fired.
    pub(super) fn request_deadline(&mut self, id: &DocumentId, at: Timestamp) {
        let Some((awaiting, has_it)) = self.answers(id) else {
            return;
        };
        let answering = awaiting || has_it;
        let Some(doc) = self.docs.get_mut(id) else {
            return;
        };
        match doc
            .request
            .on_deadline(at, self.now, self.cfg.request_timeout, answering)
        {
            Expiry::Stale => {}
            Expiry::Extended(deadline) => {
                self.timers.insert((deadline, Timer::Request(id.clone())));
            }
            Expiry::Unavailable => self.mark_unavailable(id),
        }
    }

    /// Whether a connected peer has offered the document (see
    /// [`Doc::someone_has_it`]).
    pub(super) fn someone_has_it(&self, id: &DocumentId) -> bool {
        self.docs
            .get(id)
            .is_some_and(|doc| doc.someone_has_it(|p| self.peers.contains_key(p)))
    }

    pub(super) fn mark_unavailable(&mut self, id: &DocumentId) {
        let Some(doc) = self.docs.get_mut(id) else {
            return;
        };
        doc.status = DocStatus::Unavailable;
        let (finds, tell) = doc
            .request
            .unavailable(doc.peers.iter_mut().map(|(p, dp)| (p, &mut dp.ask)));
        for cmd in finds {
            self.out.completed.push((
                cmd,
                CommandResult::Find(Err(FindError::Unavailable(id.clone()))),
            ));
        }
        self.out.events.push(Event::DocUnavailable {
            document_id: id.clone(),
        });
        for peer in tell {
            let message = Message::DocUnavailable {
                sender_id: self.cfg.peer_id.clone(),
                target_id: peer.clone(),
                document_id: id.clone(),
            };
            self.send_to_peer(&peer, message);
        }
    }

    pub(super) fn on_doc_unavailable(&mut self, peer: &PeerId, id: &DocumentId) {
        let Some(doc) = self.docs.get_mut(id) else {
            return;
        };
        let Some(dp) = doc.peers.get_mut(peer) else {
            return;
        };
        dp.ask.on_unavailable();
        // The peer dropped its side of the exchange; if the document turns
        // up later we start over with it.
        dp.sync = PeerSync::default();
        self.check_request_done(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);
    const GRACE: Duration = Duration::from_millis(500);
    const T0: Timestamp = Timestamp(1_000);

    fn peer(name: &str) -> PeerId {
        PeerId::new(name).expect("valid peer id")
    }

    /// Two peers, both connected unless said otherwise.
    fn two() -> [(PeerId, PeerAsk); 2] {
        [
            (peer("a"), PeerAsk::default()),
            (peer("b"), PeerAsk::default()),
        ]
    }

    fn connected(peers: &[(PeerId, PeerAsk)]) -> impl Iterator<Item = (&PeerAsk, bool)> {
        peers.iter().map(|(_, a)| (a, true))
    }

    fn begin(
        req: &mut Request,
        peers: &mut [(PeerId, PeerAsk)],
        anyone: bool,
        grace: Duration,
    ) -> Begin {
        req.begin(T0, anyone, TIMEOUT, grace, peers.iter_mut().map(|(_, a)| a))
    }

    #[test]
    fn a_round_with_peers_to_ask_waits_the_request_timeout() {
        let mut req = Request::default();
        let mut peers = two();
        assert_eq!(
            begin(&mut req, &mut peers, true, GRACE),
            Begin::Until(T0.plus(TIMEOUT))
        );
        // Nobody asked yet, nobody has it: no grace applies with peers.
        assert!(req.all_said_no(T0, Request::awaiting(connected(&peers)), false));
        assert!(peers[0].1.ask(true));
        assert!(
            !req.all_said_no(T0, Request::awaiting(connected(&peers)), false),
            "a asked, no answer yet"
        );
        peers[0].1.on_unavailable();
        assert!(req.all_said_no(T0, Request::awaiting(connected(&peers)), false));
        assert!(
            !req.all_said_no(T0, Request::awaiting(connected(&peers)), true),
            "an offer keeps the round open"
        );
    }

    #[test]
    fn with_nobody_to_ask_the_grace_period_decides() {
        let mut req = Request::default();
        let mut peers = two();
        assert_eq!(
            begin(&mut req, &mut peers, false, Duration::ZERO),
            Begin::Unavailable
        );
        assert_eq!(
            begin(&mut req, &mut peers, false, GRACE),
            Begin::Until(T0.plus(GRACE))
        );
        assert!(!req.all_said_no(T0, Request::awaiting(connected(&peers)), false));
        assert!(!req.all_said_no(
            Timestamp(T0.0 + 499),
            Request::awaiting(connected(&peers)),
            false
        ));
        assert!(req.all_said_no(T0.plus(GRACE), Request::awaiting(connected(&peers)), false));
    }

    #[test]
    fn a_peer_is_asked_once_a_round_and_never_after_it_said_no() {
        let mut req = Request::default();
        let mut peers = two();
        assert!(!peers[0].1.ask(false), "no round, no request");
        begin(&mut req, &mut peers, true, GRACE);
        assert!(peers[0].1.ask(true));
        assert!(!peers[0].1.ask(true), "once per round");
        begin(&mut req, &mut peers, true, GRACE);
        assert!(peers[0].1.ask(true), "a new round asks again");
        peers[1].1.on_request();
        assert!(peers[1].1.lacks());
        assert!(!peers[1].1.ask(true), "it asked us: it lacks the document");
        peers[1].1.on_offer();
        assert!(peers[1].1.ask(true), "it offered heads since");
    }

    #[test]
    fn a_disconnected_peer_owes_no_answer() {
        let mut req = Request::default();
        let mut peers = two();
        begin(&mut req, &mut peers, true, GRACE);
        assert!(peers[0].1.ask(true));
        let gone = peers.iter().map(|(p, a)| (a, p != &peer("a")));
        assert!(!Request::awaiting(gone));
        let gone = peers.iter().map(|(p, a)| (a, p != &peer("a")));
        assert!(req.all_said_no(T0, Request::awaiting(gone), false));
    }

    #[test]
    fn the_deadline_extends_once_while_a_peer_answers() {
        let mut req = Request::default();
        let mut peers = two();
        let Begin::Until(first) = begin(&mut req, &mut peers, true, GRACE) else {
            panic!("round should start");
        };
        assert_eq!(
            req.on_deadline(Timestamp(1), first, TIMEOUT, true),
            Expiry::Stale
        );
        let Expiry::Extended(second) = req.on_deadline(first, first, TIMEOUT, true) else {
            panic!("an answering peer earns one extension");
        };
        assert_eq!(second, first.plus(TIMEOUT));
        assert_eq!(
            req.on_deadline(first, second, TIMEOUT, true),
            Expiry::Stale,
            "moved"
        );
        assert_eq!(
            req.on_deadline(second, second, TIMEOUT, true),
            Expiry::Unavailable
        );
    }

    #[test]
    fn the_deadline_gives_up_when_nobody_answers() {
        let mut req = Request::default();
        let mut peers = two();
        let Begin::Until(at) = begin(&mut req, &mut peers, true, GRACE) else {
            panic!("round should start");
        };
        assert_eq!(req.on_deadline(at, at, TIMEOUT, false), Expiry::Unavailable);
        assert_eq!(
            Request::default().on_deadline(at, at, TIMEOUT, true),
            Expiry::Stale
        );
    }

    #[test]
    fn unavailable_answers_waiters_and_tells_each_asking_peer_once() {
        let mut req = Request::default();
        let mut peers = two();
        req.want();
        req.wait(CommandId(1));
        req.wait(CommandId(2));
        let Begin::Until(at) = begin(&mut req, &mut peers, true, GRACE) else {
            panic!("round should start");
        };
        peers[1].1.on_request();
        let (finds, tell) = req.unavailable(peers.iter_mut().map(|(p, a)| (&*p, a)));
        assert_eq!(finds, vec![CommandId(1), CommandId(2)]);
        assert_eq!(tell, vec![peer("b")]);
        assert_eq!(
            req.on_deadline(at, at, TIMEOUT, true),
            Expiry::Stale,
            "round over"
        );
        let (finds, tell) = req.unavailable(peers.iter_mut().map(|(p, a)| (&*p, a)));
        assert!(finds.is_empty() && tell.is_empty(), "told once");
        peers[1].1.on_request();
        let (_, tell) = req.unavailable(peers.iter_mut().map(|(p, a)| (&*p, a)));
        assert_eq!(tell, vec![peer("b")], "a new request is answered again");
        assert!(req.wanted() && !req.is_idle());
    }

    #[test]
    fn reloading_keeps_who_waits_but_not_the_round() {
        let mut req = Request::default();
        let mut peers = two();
        req.wait(CommandId(7));
        let Begin::Until(at) = begin(&mut req, &mut peers, true, GRACE) else {
            panic!("round should start");
        };
        let mut kept = req.interest();
        assert!(kept.has_waiters() && !kept.wanted());
        assert_eq!(kept.on_deadline(at, at, TIMEOUT, false), Expiry::Stale);
        assert_eq!(kept.finish(), vec![CommandId(7)]);
        assert!(kept.is_idle());
    }
}
