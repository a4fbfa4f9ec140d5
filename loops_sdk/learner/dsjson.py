"""Import Vowpal Wabbit DSJSON logs (Azure Personalizer, rlclientlib) into the learner's store
(``loops import dsjson FILE... --policy NAME --db PATH``).

A DSJSON file holds one contextual-bandit event per line::

    {"_label_cost": -1.0, "_label_probability": 0.85, "_label_Action": 4, "_labelIndex": 3,
     "o": [{"v": 1.0, "EventId": "e1", "ActionTaken": false}],
     "Timestamp": "2021-02-04T16:31:29.2460000Z", "Version": "1", "EventId": "e1",
     "a": [4, 1, 2, 3], "c": {"FromUrl": [{"weather": "Sunny"}], "_multi": [
         {"_tag": "Cappucino", "j": [{"roast": "dark"}]}, ...]},
     "p": [0.85, 0.05, 0.05, 0.05], "VWState": {"m": "model-id"}, "_original_label_cost": -1.0}

How each event becomes a stored decision:

* **Actions** are the ``c._multi`` entries; an entry's id is its ``_tag`` (Personalizer writes
  the action id there), else ``action_<i>`` by position (1-based). The policy's actions are
  every id seen, in first-seen order; an event's eligible set is the actions it lists.
* **Chosen action and propensity**: ``_labelIndex`` (0-based into ``_multi``; ``_label_Action``
  is the same 1-based and must agree), probability ``_label_probability`` (else the one ``p``
  gives the chosen action in ``a``: action indexes, 1-based and chosen first as rlclientlib
  writes them, 0-based accepted). ``a`` and ``p`` must be lists of one length, ``p`` a
  probability vector, ``a`` within ``_multi``.
* **Reward = -cost**: ``_label_cost`` becomes a reward outcome of value ``-_label_cost`` for
  the event (VW minimises cost, LOOPS maximises reward). An event without ``_label_cost``
  (a dangling event: no reward joined) is stored without an outcome, so the learner's default
  reward applies. ``_original_label_cost`` (the cost before the logger's transforms) is not
  used; events where it differs are counted. ``_skipLearn: true`` (an event never activated)
  is stored as a deferred decision that is never activated, so it is not trained on.
  A dangling reward line (``RewardValue`` without a context) is stored as a reward outcome of
  its ``EventId`` with value ``RewardValue``.
* **Features** are flattened to named numeric inputs: a number (or bool: 1/0) at path
  ``ns.sub.name`` is the input ``ns.sub.name`` (top-level ones keep their bare name); a string
  ``v`` is the one-hot input ``ns.name=v`` (value 1; VW hashes name and value together the same
  way); an array of numbers gives ``ns.name[0]``, ``ns.name[1]``, ...; an array of objects
  adds each object's features under the same prefix (values of a repeated name add up, as
  in VW's linear model); keys starting with ``_`` (``_tag``, ``_text``, ...) and nulls are not
  features. A per-action (``_multi``) feature of action ``A`` is the input ``@A.<path>``
  (``action_features=False`` drops them). Inputs are sorted by name; an input an event lacks
  is 0.
* ``EventId`` is hashed (BLAKE2b, 128 bits) into the event id; ``Timestamp`` (UTC) is the
  decision time. The user key is unknown (hash 0: no holdout, no caps).

A line that is not such an event is *bad*: it is counted and reported with its file and line
number (:class:`ImportResult`) and nothing of it is stored; the other lines are imported.
Each file is stored as batches under a client id derived from its bytes, so importing the
same file again stores nothing twice. When the store has no policy ``NAME`` one is created
(version 1, the layout above, zero weights, epsilon-greedy 0.1, rewards joined on arrival) so
that off-policy evaluation (``read_logged_data`` + ``loops_sdk.evaluation``) and the learner's
training run on the imported rows at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from calendar import timegm
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import ArgumentError, LoopsError
from ..policy import Action, Exploration, LearningSettings, Policy
from ..records import (FLAG_DEFERRED, MAX_TS_NS, OUTCOME_REWARD, DecisionBlock, FeedbackRecords,
                       OutcomeBlock)
from .store import EventStore

__all__ = ["BadLine", "ImportResult", "DsjsonError", "import_dsjson", "parse_event",
           "flatten_features", "learn_once"]

CHUNK = 5000              # events per stored batch
IMPORTED_REASON = "imported from DSJSON logs"   # the created policy's reason (replay reads it)
REWARD_KIND = "reward"    # outcome kind of the imported rewards
_TS = re.compile(r"(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?"
                 r"(Z|[+-]\d\d:?\d\d)?$")


class DsjsonError(LoopsError, ValueError):
    """A line that is not a DSJSON contextual-bandit event (the message says why)."""


@dataclass(frozen=True)
class BadLine:
    file: str
    line: int            # 1-based
    reason: str


@dataclass
class ImportResult:
    """What an import stored and what it could not read."""

    policy: str
    files: list[str]
    lines: int = 0                 # non-blank lines read
    imported: int = 0              # decisions stored now
    rewarded: int = 0              # ... of which with a reward (-_label_cost)
    no_reward: int = 0             # dangling events: stored without an outcome
    default_cost: int = 0          # rewarded, but with no observation ("o"): the logger's default
    original_cost_differs: int = 0
    skip_learn: int = 0            # _skipLearn: stored deferred, never trained on
    dangling_rewards: int = 0      # RewardValue lines stored as reward outcomes
    duplicates: int = 0            # EventIds seen before in this import (first kept)
    already_stored: int = 0        # decisions in batches the store already held
    pdrop: int = 0                 # events logged with a drop probability (not corrected)
    bad: list[BadLine] = field(default_factory=list)
    actions: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    created_policy: bool = False

    def format(self, max_bad: int = 20) -> str:
        out = [f"imported {self.imported:,} decisions into policy {self.policy!r} from "
               f"{len(self.files)} file(s): {self.rewarded:,} with a reward (reward = -cost), "
               f"{self.no_reward:,} without (dangling: the default reward applies)",
               f"  {len(self.actions)} actions, {len(self.inputs)} inputs"
               + ("; policy v1 created" if self.created_policy else "; existing policy kept")]
        extra = [(self.default_cost, "rewarded with no observation (the logger's default)"),
                 (self.original_cost_differs, "with _original_label_cost != _label_cost "
                                              "(_label_cost used)"),
                 (self.skip_learn, "_skipLearn (stored, never trained on)"),
                 (self.dangling_rewards, "dangling reward lines stored as rewards"),
                 (self.duplicates, "duplicate EventIds (first kept)"),
                 (self.already_stored, "already stored by an earlier import"),
                 (self.pdrop, "with pdrop > 0 (propensities not corrected for drops)")]
        out += [f"  {n:,} {what}" for n, what in extra if n]
        if self.bad:
            out.append(f"  {len(self.bad):,} bad line(s), not imported:")
            out += [f"    {b.file}:{b.line}: {b.reason}" for b in self.bad[:max_bad]]
            if len(self.bad) > max_bad:
                out.append(f"    ... and {len(self.bad) - max_bad:,} more")
        return "\n".join(out)


# --------------------------------------------------------------------------- one line
@dataclass
class _Event:
    event_id: str
    ts_ns: int
    actions: list[str]
    chosen: int                    # index into actions
    prob: float
    cost: float | None
    shared: dict[str, float]
    per_action: list[dict[str, float]]
    skip_learn: bool
    observed: bool
    original_differs: bool
    pdrop: bool


def _number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise DsjsonError(f"{what} is {v!r}, not a number")
    f = float(v)
    if not math.isfinite(f):
        raise DsjsonError(f"{what} is {v!r}, not finite")
    return f


def flatten_features(obj: Any, prefix: str = "", out: dict[str, float] | None = None
                     ) -> dict[str, float]:
    """VW JSON features as ``{input name: value}`` (the naming scheme in the module doc)."""
    out = {} if out is None else out
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str) or k.startswith("_"):
                continue
            _flatten_value(v, f"{prefix}.{k}" if prefix else k, out)
        return out
    raise DsjsonError(f"features at {prefix or 'c'!r} are {type(obj).__name__}, not an object")


def _flatten_value(v: Any, name: str, out: dict[str, float]) -> None:
    if v is None:
        return
    if isinstance(v, bool):
        out[name] = out.get(name, 0.0) + (1.0 if v else 0.0)
    elif isinstance(v, (int, float)):
        out[name] = out.get(name, 0.0) + _number(v, f"feature {name!r}")
    elif isinstance(v, str):
        key = f"{name}={v}"
        out[key] = out.get(key, 0.0) + 1.0
    elif isinstance(v, dict):
        flatten_features(v, name, out)
    elif isinstance(v, list):
        for i, item in enumerate(v):
            if isinstance(item, dict):
                flatten_features(item, name, out)
            elif isinstance(item, (int, float)) and not isinstance(item, bool):
                key = f"{name}[{i}]"
                out[key] = out.get(key, 0.0) + _number(item, f"feature {key!r}")
            elif item is not None:
                raise DsjsonError(f"feature {name!r}[{i}] is {item!r}: arrays hold numbers "
                                  "or objects")
    else:  # pragma: no cover - json.loads gives no other types
        raise DsjsonError(f"feature {name!r} has an unsupported value {v!r}")


def _timestamp_ns(text: Any) -> int:
    m = _TS.match(text) if isinstance(text, str) else None
    if m is None:
        raise DsjsonError(f"Timestamp {text!r} is not an ISO time (e.g. 2021-07-29T10:00:00Z)")
    y, mo, d, h, mi, s = (int(g) for g in m.groups()[:6])
    frac, zone = m.group(7) or "", m.group(8)
    try:
        secs = timegm((y, mo, d, h, mi, s, 0, 0, 0))
    except (ValueError, OverflowError):
        raise DsjsonError(f"Timestamp {text!r} is not a valid time") from None
    if not (1 <= mo <= 12 and 1 <= d <= 31 and h < 24 and mi < 60 and s < 61):
        raise DsjsonError(f"Timestamp {text!r} is not a valid time")
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        zz = zone[1:].replace(":", "")
        secs -= sign * (int(zz[:2]) * 3600 + int(zz[2:]) * 60)
    ns = secs * 1_000_000_000 + int((frac + "000000000")[:9])
    if not 0 <= ns <= MAX_TS_NS:
        raise DsjsonError(f"Timestamp {text!r} is outside 1970..2200")
    return ns


def parse_event(doc: Any, *, action_features: bool = True) -> _Event:
    """One decoded DSJSON line as an event; :class:`DsjsonError` says what is wrong."""
    if not isinstance(doc, dict):
        raise DsjsonError(f"line is a JSON {type(doc).__name__}, not an object")
    c = doc.get("c")
    if not isinstance(c, dict):
        raise DsjsonError("no context object 'c'")
    if "_slots" in c:
        raise DsjsonError("'_slots' (CCB / slates) events are not supported")
    multi = c.get("_multi")
    if not isinstance(multi, list) or not multi:
        raise DsjsonError("'c._multi' is missing or empty (not a CB ADF event)")
    event_id = doc.get("EventId")
    if not isinstance(event_id, str) or not event_id:
        raise DsjsonError("no 'EventId' string")
    ts = _timestamp_ns(doc.get("Timestamp"))
    ids: list[str] = []
    per_action: list[dict[str, float]] = []
    for i, a in enumerate(multi):
        if not isinstance(a, dict):
            raise DsjsonError(f"c._multi[{i}] is not an object")
        tag = a.get("_tag")
        if tag is not None and (not isinstance(tag, str) or not tag):
            raise DsjsonError(f"c._multi[{i}]._tag is {tag!r}, not a non-empty string")
        aid = tag if tag is not None else f"action_{i + 1}"
        if aid in ids:
            raise DsjsonError(f"c._multi[{i}]: duplicate action id {aid!r}")
        ids.append(aid)
        per_action.append(flatten_features(a, f"@{aid}") if action_features else {})
    shared = flatten_features({k: v for k, v in c.items() if k != "_multi"})
    n = len(multi)
    index = doc.get("_labelIndex")
    label = doc.get("_label_Action")
    for what, v in (("_labelIndex", index), ("_label_Action", label)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise DsjsonError(f"{what} is {v!r}, not an integer")
    if index is None and label is None:
        raise DsjsonError("no chosen action (_labelIndex / _label_Action)")
    if index is not None and label is not None and label != index + 1:
        raise DsjsonError(f"_label_Action {label} and _labelIndex {index} disagree "
                          "(_label_Action is 1-based)")
    chosen = index if index is not None else label - 1
    if not 0 <= chosen < n:
        raise DsjsonError(f"chosen action {chosen} (0-based) is outside c._multi ({n} actions)")
    a, p = doc.get("a"), doc.get("p")
    p_chosen = None
    if a is not None or p is not None:
        if not isinstance(a, list) or not isinstance(p, list) or len(a) != len(p) or not a:
            raise DsjsonError("'a' and 'p' must be lists of the same non-zero length")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in a):
            raise DsjsonError("'a' holds non-integer action indexes")
        probs = [_number(v, "p entry") for v in p]
        if any(q < 0 or q > 1 for q in probs) or abs(sum(probs) - 1.0) > 1e-3:
            raise DsjsonError(f"'p' is not a probability vector (sum {sum(probs):.6g})")
        if any(v < 0 or v > n for v in a):
            raise DsjsonError(f"'a' = {a} holds indexes outside c._multi ({n} actions)")
        # rlclientlib writes 1-based indexes, chosen first; VW itself reads only the label.
        pos = (a.index(chosen + 1) if min(a) >= 1 and chosen + 1 in a else
               a.index(chosen) if min(a) == 0 and chosen in a else None)
        p_chosen = None if pos is None else probs[pos]
    prob = doc.get("_label_probability")
    if prob is None:
        if p_chosen is None:
            raise DsjsonError("no propensity (_label_probability or 'p')")
        prob = p_chosen
    prob = _number(prob, "_label_probability")
    if not 0.0 < prob <= 1.0:
        raise DsjsonError(f"_label_probability {prob} is not in (0, 1]")
    cost = doc.get("_label_cost")
    cost = None if cost is None else _number(cost, "_label_cost")
    orig = doc.get("_original_label_cost")
    orig = None if orig is None else _number(orig, "_original_label_cost")
    obs = doc.get("o")
    skip = doc.get("_skipLearn", False)
    pdrop = doc.get("pdrop", 0)
    return _Event(event_id=event_id, ts_ns=ts, actions=ids, chosen=chosen, prob=prob,
                  cost=cost, shared=shared, per_action=per_action, skip_learn=skip is True,
                  observed=isinstance(obs, list) and len(obs) > 0,
                  original_differs=cost is not None and orig is not None and orig != cost,
                  pdrop=isinstance(pdrop, (int, float)) and not isinstance(pdrop, bool)
                  and pdrop > 0)


def _event_id(text: str) -> tuple[int, int]:
    d = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return int.from_bytes(d[:8], "big"), int.from_bytes(d[8:], "big")


# --------------------------------------------------------------------------- the import
def import_dsjson(files: Sequence[str | Path] | str | Path, db: EventStore | str | Path,
                  policy: str, *, action_features: bool = True) -> ImportResult:
    """Read DSJSON ``files`` and store their events under decision point ``policy``.

    Raises :class:`~loops_sdk.errors.ArgumentError` (``field="policy"``) when the store holds
    a policy ``policy`` whose actions or inputs differ from the files' layout, and
    ``OSError`` for a file that cannot be read; bad lines never raise (see
    :class:`ImportResult`)."""
    if isinstance(files, (str, Path)):
        files = [files]
    if not isinstance(policy, str) or not policy:
        raise ArgumentError("policy: a non-empty decision point name", field="policy")
    res = ImportResult(policy=policy, files=[str(f) for f in files])
    per_file: list[tuple[str, list[_Event], list[tuple[str, float, int]]]] = []
    seen: set[str] = set()
    action_order: dict[str, None] = {}
    names: set[str] = set()
    for f in files:
        data = Path(f).read_bytes()
        client_id = "dsjson:" + hashlib.sha256(data).hexdigest()[:32]
        events: list[_Event] = []
        rewards: list[tuple[str, float, int]] = []
        for no, raw in enumerate(data.splitlines(), 1):
            if not raw.strip():
                continue
            res.lines += 1
            try:
                try:
                    doc = json.loads(raw)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise DsjsonError(f"not JSON: {exc}") from None
                if isinstance(doc, dict) and "RewardValue" in doc and "c" not in doc:
                    eid = doc.get("EventId")
                    if not isinstance(eid, str) or not eid:
                        raise DsjsonError("dangling reward line without an 'EventId'")
                    ts = doc.get("EnqueuedTimeUtc", doc.get("Timestamp"))
                    rewards.append((eid, _number(doc["RewardValue"], "RewardValue"),
                                    _timestamp_ns(ts) if ts is not None else 0))
                    continue
                ev = parse_event(doc, action_features=action_features)
            except DsjsonError as exc:
                res.bad.append(BadLine(str(f), no, str(exc)))
                continue
            if ev.event_id in seen:
                res.duplicates += 1
                continue
            seen.add(ev.event_id)
            events.append(ev)
            action_order.update(dict.fromkeys(ev.actions))
            names.update(ev.shared)
            for feats in ev.per_action:
                names.update(feats)
        per_file.append((client_id, events, rewards))
    actions = tuple(action_order)
    inputs = tuple(sorted(names))
    res.actions, res.inputs = actions, inputs
    own = not isinstance(db, EventStore)
    store = EventStore(db) if own else db
    try:
        if actions:
            res.created_policy = _ensure_policy(store, policy, actions, inputs)
        a_index = {a: i for i, a in enumerate(actions)}
        col = {n: j for j, n in enumerate(inputs)}
        for client_id, events, rewards in per_file:
            seq = 0
            for start in range(0, max(len(events), 1), CHUNK):
                part = events[start:start + CHUNK]
                if not part and not rewards:
                    break
                extra = rewards if start + CHUNK >= len(events) else []
                recs = _records(policy, actions, inputs, a_index, col, part, extra)
                seq += 1
                stored, dup = store.ingest(client_id, seq, recs)
                if dup:
                    res.already_stored += recs.n_decisions
                    continue
                res.imported += len(part)
                res.rewarded += sum(e.cost is not None for e in part)
                res.no_reward += sum(e.cost is None for e in part)
                res.default_cost += sum(e.cost is not None and not e.observed for e in part)
                res.original_cost_differs += sum(e.original_differs for e in part)
                res.skip_learn += sum(e.skip_learn for e in part)
                res.pdrop += sum(e.pdrop for e in part)
                res.dangling_rewards += len(extra)
    finally:
        if own:
            store.close()
    return res


def _ensure_policy(store: EventStore, name: str, actions: tuple[str, ...],
                   inputs: tuple[str, ...]) -> bool:
    """Create policy ``name`` v1 for the layout, or check the stored one has it."""
    stored = store.get_policy(name)
    if stored is not None:
        have = Policy.from_bytes(stored.data)
        if have.action_ids != actions or have.input_names != inputs:
            raise ArgumentError(
                f"policy: the store's policy {name!r} v{have.version} has actions "
                f"{list(have.action_ids)[:8]} and {have.n_inputs} inputs, the files "
                f"{list(actions)[:8]} and {len(inputs)} inputs: import under another "
                "--policy name", field="policy")
        return False
    pol = Policy.linear(name, list(inputs), [Action(a) for a in actions], version=1,
                        exploration=Exploration.epsilon_greedy(0.1),
                        learning=LearningSettings(aggregation="first"))
    store.add_policy(name, 1, pol.to_bytes(), IMPORTED_REASON, "deployed",
                     decision="initial")
    return True


def _records(policy: str, actions: tuple[str, ...], inputs: tuple[str, ...],
             a_index: dict[str, int], col: dict[str, int], events: list[_Event],
             rewards: Iterable[tuple[str, float, int]]) -> FeedbackRecords:
    n, k, d = len(events), len(actions), len(inputs)
    x = np.zeros((n, d))
    eligible = np.zeros((n, k), np.uint8)
    hi = np.empty(n, np.uint64)
    lo = np.empty(n, np.uint64)
    out: list[tuple[int, int, int, float]] = []
    for i, e in enumerate(events):
        for name, v in e.shared.items():
            x[i, col[name]] = v
        for feats in e.per_action:
            for name, v in feats.items():
                x[i, col[name]] = v
        idx = [a_index[a] for a in e.actions]
        eligible[i, idx] = 1
        h, l = _event_id(e.event_id)
        hi[i], lo[i] = h, l
        if e.cost is not None:
            out.append((h, l, e.ts_ns, -e.cost))
    for eid, value, ts in rewards:
        h, l = _event_id(eid)
        out.append((h, l, ts, value))
    block = DecisionBlock(
        policy=policy, actions=list(actions), inputs=list(inputs), event_hi=hi, event_lo=lo,
        ts_ns=np.array([e.ts_ns for e in events], np.int64),
        version=np.ones(n, np.uint64), user_hash=np.zeros(n, np.uint64), x=x,
        eligible=eligible,
        action=np.array([a_index[e.actions[e.chosen]] for e in events], np.int32),
        prob=np.array([e.prob for e in events], np.float64),
        flags=np.array([FLAG_DEFERRED if e.skip_learn else 0 for e in events], np.uint8))
    m = len(out)
    outcomes = OutcomeBlock(
        type=np.full(m, OUTCOME_REWARD, np.uint8),
        event_hi=np.array([o[0] for o in out], np.uint64),
        event_lo=np.array([o[1] for o in out], np.uint64),
        user_hash=np.zeros(m, np.uint64), ts_ns=np.array([o[2] for o in out], np.int64),
        value=np.array([o[3] for o in out], np.float64), kind=np.zeros(m, np.uint16),
        kinds=[REWARD_KIND])
    return FeedbackRecords([block] if n else [], outcomes)


def learn_once(db: str | Path) -> str:
    """One learner round on the store (what ``loops learner`` does every tick): join every
    row whose reward is final (imported rows are: their windows are long past), retrain the
    policies that are due and put each candidate through the promotion gate. Returns a line
    saying what it did. ``loops import dsjson`` runs it unless ``--no-learn``."""
    from .service import Learner
    learner = Learner(db)
    try:
        joined, published = learner.step()
        versions = {r.name: r.version for r in learner.store.current_policies()}
        latest = {name: learner.store.latest_version(name) for name in versions}
    finally:
        learner.stop()
    trained = ", ".join(f"{n} v{v}" for n, v in latest.items() if v > 1) or "none yet"
    return (f"learner round: joined {joined.total:,} rows; published "
            f"{', '.join(f'{n} v{v}' for n, v in published) or 'nothing'}; trained "
            f"versions stored: {trained}")
