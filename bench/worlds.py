"""Streams for the learning-quality bench (``python -m bench --only learning``).

Two kinds, both with fixed seeds and bounded sizes:

* :func:`classification_stream`: the contextual-bandit bake-off protocol: a multiclass data
  set read as a bandit problem (each class is an action; reward 1 for the true class, 0
  otherwise; only the chosen action's reward is revealed). Data sets that ship inside
  scikit-learn (no downloads) and synthetic multiclass streams from ``make_classification``.
* :class:`CrmWorld`: simulated players in hidden segments, bonuses that cost money, deposits
  that are zero-inflated and log-normal (heavy-tailed), and at ``change_at`` the best bonus of
  the largest segment changes. Expected net values are known, so the oracle is exact.
* :func:`new_bonus_stream`: a CRM world whose bonuses are described by numeric attributes
  (face value, wagering requirement) and whose response is linear in them; a new bonus with
  attributes between the existing ones is introduced mid-run and is the best for the largest
  segment. It measures how fast a method uses a bonus it has never seen.

Every stream exposes the same surface: ``X`` (n, d) float features, ``n_actions``,
``action_ids``, ``costs``, ``expected(t)`` (the expected reward of every action at row ``t``)
and ``draw(t, action, rng)`` (an observed reward).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Stream", "classification_stream", "sklearn_streams", "synthetic_streams",
           "CrmWorld", "crm_worlds", "new_bonus_stream"]


@dataclass
class Stream:
    """A finite contextual-bandit stream.

    Attributes:
        name: label for the table.
        X: ``(n, d)`` features, standardised.
        mean: ``(n, K)`` expected reward of every action at every row (net of cost).
        action_ids: the actions' names.
        costs: ``(K,)`` what each action costs (already subtracted in ``mean``).
        noise: ``"bernoulli"`` (classification: the reward is the mean, 0 or 1) or a callable
            ``(rows, actions, rng) -> observed reward``.
        change_at: row where the world changes (``None``: stationary).
        segment: ``(n,)`` hidden segment of each row (CRM worlds), for the report only.
        eligible: ``(n, K)`` which actions exist at each row (``None``: all); an action
            introduced mid-run is ineligible before. The oracle picks among eligible ones.
    """

    name: str
    X: np.ndarray
    mean: np.ndarray
    action_ids: tuple[str, ...]
    costs: np.ndarray
    noise: object = "bernoulli"
    change_at: int | None = None
    segment: np.ndarray | None = None
    kind: str = "classification"
    meta: dict = field(default_factory=dict)
    eligible: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_actions(self) -> int:
        return int(self.mean.shape[1])

    def oracle(self) -> np.ndarray:
        """``(n,)`` the best expected reward at each row (what an all-knowing policy gets)."""
        return self._available().max(axis=1)

    def oracle_actions(self) -> np.ndarray:
        return self._available().argmax(axis=1)

    def _available(self) -> np.ndarray:
        return self.mean if self.eligible is None else np.where(self.eligible, self.mean,
                                                                 -np.inf)

    def draw(self, rows: np.ndarray, actions: np.ndarray, rng: np.random.Generator
             ) -> np.ndarray:
        """Observed rewards (net of cost) for ``actions`` at ``rows``."""
        rows = np.asarray(rows)
        actions = np.asarray(actions)
        if self.noise == "bernoulli":
            return self.mean[rows, actions].astype(np.float64)
        return self.noise(rows, actions, rng)


def _standardise(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    sd = X.std(axis=0)
    sd[sd == 0] = 1.0
    return (X - X.mean(axis=0)) / sd


def classification_stream(name: str, X: np.ndarray, y: np.ndarray, *, seed: int = 0,
                          passes: int = 1) -> Stream:
    """A multiclass data set as a bandit stream: shuffled (``seed``), ``passes`` times over,
    reward 1 for the true label. Features are standardised; labels become ``0..K-1``."""
    classes, labels = np.unique(np.asarray(y), return_inverse=True)
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(labels)) for _ in range(passes)])
    Xs = _standardise(X)[order]
    lab = labels[order]
    mean = np.zeros((len(lab), len(classes)))
    mean[np.arange(len(lab)), lab] = 1.0
    return Stream(name, Xs, mean, tuple(f"class_{c}" for c in classes),
                  np.zeros(len(classes)), meta={"classes": len(classes),
                                                "features": X.shape[1], "passes": passes})


def sklearn_streams(limit: int | None = None) -> list[Stream]:
    """Data sets bundled with scikit-learn (read from the installed package, no network)."""
    from sklearn import datasets
    out = []
    for name, loader, passes in (("digits", datasets.load_digits, 3),
                                 ("wine", datasets.load_wine, 20),
                                 ("breast_cancer", datasets.load_breast_cancer, 5)):
        X, y = loader(return_X_y=True)
        s = classification_stream(f"sklearn:{name}", X, y, seed=11, passes=passes)
        out.append(_truncate(s, limit))
    return out


def synthetic_streams(n: int = 20_000, limit: int | None = None) -> list[Stream]:
    """Synthetic multiclass streams: a linear one and a harder one with more classes."""
    from sklearn.datasets import make_classification
    out = []
    for name, kw in (("synthetic:linear-5", dict(n_features=10, n_informative=6, n_classes=5,
                                                 n_clusters_per_class=1, class_sep=1.5)),
                     ("synthetic:clusters-8", dict(n_features=20, n_informative=10,
                                                   n_classes=8, n_clusters_per_class=2,
                                                   class_sep=1.5))):
        X, y = make_classification(n_samples=n, random_state=5, n_redundant=0, **kw)
        out.append(_truncate(classification_stream(name, X, y, seed=13), limit))
    return out


def _truncate(s: Stream, limit: int | None) -> Stream:
    if limit is None or s.n <= limit:
        return s
    return Stream(s.name, s.X[:limit], s.mean[:limit], s.action_ids, s.costs, s.noise,
                  s.change_at if s.change_at is None or s.change_at < limit else None,
                  None if s.segment is None else s.segment[:limit], s.kind, dict(s.meta))


class CrmWorld:
    """Simulated players and bonuses with heavy-tailed deposits and a mid-run change.

    A player belongs to one hidden segment; the features are the segment's one-hot columns
    (observed noisily: ``confusion`` of the players show a random segment) plus numeric
    behaviour features. A bonus ``a`` costs ``costs[a]``; the player deposits with probability
    ``p[s, a]``, and then a log-normal amount with mean ``amount[s, a]`` and log-sd ``sigma``
    (heavy tail). Reward = deposit - cost. From row ``change_at`` on, segment ``changed_segment``
    responds with ``after`` instead (its best bonus changes).

    Args:
        name: label.
        deposit: ``(S, K)`` expected deposit (before cost) per segment and action.
        after: ``(K,)`` the changed segment's expected deposits after the change.
        share: ``(S,)`` segment shares.
        costs: ``(K,)``.
        p_deposit: probability a player deposits at all (the rest deposit 0).
        sigma: log-sd of a deposit's amount.
    """

    def __init__(self, name: str, action_ids: tuple[str, ...], costs, deposit, share,
                 changed_segment: int, after, *, p_deposit: float = 0.3, sigma: float = 1.0,
                 confusion: float = 0.1, extra_features: int = 3) -> None:
        self.name = name
        self.action_ids = tuple(action_ids)
        self.costs = np.asarray(costs, dtype=np.float64)
        self.deposit = np.asarray(deposit, dtype=np.float64)
        self.after = np.asarray(after, dtype=np.float64)
        self.share = np.asarray(share, dtype=np.float64) / np.sum(share)
        self.changed_segment = int(changed_segment)
        self.p_deposit = float(p_deposit)
        self.sigma = float(sigma)
        self.confusion = float(confusion)
        self.extra = int(extra_features)
        if self.deposit.shape != (len(self.share), len(self.costs)):
            raise ValueError(f"deposit must be (segments, actions) = "
                             f"({len(self.share)}, {len(self.costs)}), got {self.deposit.shape}")
        if self.after.shape != (len(self.costs),):
            raise ValueError(f"after must have one entry per action, got {self.after.shape}")

    def expected_net(self, changed: bool) -> np.ndarray:
        """``(S, K)`` expected net value per segment and action, before or after the change."""
        dep = self.deposit.copy()
        if changed:
            dep[self.changed_segment] = self.after
        return dep - self.costs

    def stream(self, n: int, change_at: int | None, seed: int = 0) -> Stream:
        """``n`` players; the world changes at row ``change_at`` (``None``: never)."""
        rng = np.random.default_rng(seed)
        S, K = self.deposit.shape
        seg = rng.choice(S, size=n, p=self.share)
        shown = np.where(rng.random(n) < self.confusion, rng.integers(0, S, n), seg)
        X = np.zeros((n, S + self.extra))
        X[np.arange(n), shown] = 1.0
        # Behaviour features that depend on the segment a little (and are otherwise noise).
        X[:, S:] = rng.normal(size=(n, self.extra)) + 0.3 * seg[:, None] / max(S - 1, 1)
        before, after = self.expected_net(False), self.expected_net(True)
        changed = np.zeros(n, dtype=bool)
        if change_at is not None:
            changed[change_at:] = True
        mean = np.where(changed[:, None], after[seg], before[seg])
        gross = mean + self.costs               # expected deposit per row and action

        def noise(rows, actions, g, _gross=gross):
            return self._net(_gross[rows, actions], actions, g)

        return Stream(self.name, X, mean, self.action_ids, self.costs, noise, change_at, seg,
                      kind="crm", meta={"segments": S, "changed_segment": self.changed_segment,
                                        "p_deposit": self.p_deposit, "sigma": self.sigma})

    def _net(self, gross: np.ndarray, actions: np.ndarray, rng: np.random.Generator
             ) -> np.ndarray:
        """Observed net rewards of players whose expected deposits are ``gross``."""
        p, sigma = self.p_deposit, self.sigma
        # Zero-inflated log-normal with mean m: deposit with prob p, amount mean m / p.
        mu = np.log(np.maximum(gross, 1e-9) / p) - sigma ** 2 / 2
        dep = (rng.random(len(gross)) < p) * rng.lognormal(mu, sigma)
        return dep - self.costs[actions]

    def players(self, changed: bool = False):
        """A draw function for players who keep coming, ``draw(rows, actions, rng)``: each
        call meets ``len(rows)`` new players (segments drawn from ``share``; the row indexes
        only count them) in the world before (or after) its change. Unlike :meth:`stream`
        it holds no features, so a protocol that needs no context (an A/B test) can play
        millions of players in seconds."""
        gross = self.expected_net(changed) + self.costs

        def draw(rows, actions, rng):
            actions = np.asarray(actions, dtype=np.int64)
            seg = rng.choice(len(self.share), size=len(actions), p=self.share)
            return self._net(gross[seg, actions], actions, rng)
        return draw


def crm_worlds() -> list[CrmWorld]:
    """Two worlds no one tuned the loop for. In each, the best fixed bonus earns well under
    90 % of the oracle, so reaching it needs per-segment decisions."""
    casino = CrmWorld(
        "crm:casino", ("no_bonus", "free_spins", "deposit_match", "cashback", "vip_gift"),
        costs=[0.0, 2.0, 8.0, 5.0, 15.0],
        deposit=[
            # none  spins  match  cashback  vip
            [40.0, 41.0, 62.0, 46.0, 80.0],   # whale: the VIP gift pays for itself
            [8.0, 16.0, 11.0, 10.0, 9.0],     # casual (largest): free spins
            [6.0, 6.5, 9.0, 7.5, 6.0],        # bonus hunter: nothing pays, no bonus
            [2.0, 6.0, 8.0, 16.0, 5.0],       # churn risk: cashback
        ],
        share=[0.08, 0.5, 0.2, 0.22], changed_segment=1,
        after=[8.0, 9.0, 11.0, 20.0, 9.0],    # casual players now want cashback
        p_deposit=0.3, sigma=1.0, confusion=0.05)
    sports = CrmWorld(
        "crm:sportsbook", ("none", "free_bet", "odds_boost", "deposit_match"),
        costs=[0.0, 5.0, 2.0, 10.0],
        deposit=[
            [20.0, 24.0, 30.0, 25.0],         # regular punters: odds boost
            [5.0, 14.0, 6.0, 9.0],            # newcomers (largest): free bet
            [50.0, 52.0, 40.0, 75.0],         # high rollers: deposit match (boosts put them off)
        ],
        share=[0.3, 0.55, 0.15], changed_segment=1,
        after=[5.0, 7.0, 12.0, 9.0],          # newcomers now respond to odds boosts
        p_deposit=0.2, sigma=1.3)
    return [casino, sports]


# The new-bonus world: bonuses described by (face value, wagering requirement x).
NEW_BONUS_ACTIONS = {"no_bonus": (0.0, 0.0), "spins_10": (10.0, 0.0),
                     "match_25": (25.0, 40.0), "match_50": (50.0, 40.0),
                     # introduced mid-run: a low-wagering match, its value between the others'
                     "lowwager_30": (30.0, 5.0)}
# Per segment: expected deposit = base + per_value * value - per_wagering * wagering.
NEW_BONUS_SEGMENTS = {  # share, base, per_value, per_wagering
    "casual": (0.5, 8.0, 0.9, 0.35),       # dislikes wagering: the new bonus is its best
    "bonus_hunter": (0.3, 6.0, 0.45, 0.02),  # no bonus pays for itself
    "whale": (0.2, 40.0, 1.2, 0.05),       # the biggest bonus stays best
}
COST_PER_VALUE = 0.5   # what a bonus costs the operator per unit of face value


def new_bonus_stream(n: int = 30_000, introduce_at: int = 10_000, seed: int = 31) -> Stream:
    """A CRM stream (heavy-tailed deposits, noisy segment features) whose last action,
    ``lowwager_30``, exists only from row ``introduce_at`` on. Expected deposits are linear in
    the bonuses' attributes per segment, so a model over context x attributes can score the
    new bonus before it is ever played; a per-action model cannot. ``meta["attributes"]``
    holds each action's attributes, ``meta["introduced"]`` the new action and its row."""
    ids = tuple(NEW_BONUS_ACTIONS)
    attrs = np.array(list(NEW_BONUS_ACTIONS.values()))            # (K, 2)
    seg = np.array(list(NEW_BONUS_SEGMENTS.values()))             # (S, 4)
    deposit = seg[:, 1:2] + seg[:, 2:3] * attrs[:, 0] - seg[:, 3:4] * attrs[:, 1]
    world = CrmWorld("crm:new-bonus", ids, costs=COST_PER_VALUE * attrs[:, 0],
                     deposit=deposit, share=seg[:, 0], changed_segment=0,
                     after=deposit[0], p_deposit=0.3, sigma=1.0, confusion=0.05)
    s = world.stream(n, None, seed=seed)
    eligible = np.ones((n, len(ids)), dtype=bool)
    eligible[:introduce_at, -1] = False
    s.eligible, s.change_at = eligible, introduce_at
    s.kind = "crm"
    s.meta.update(attributes={a: {"value": v, "wagering": w}
                              for a, (v, w) in NEW_BONUS_ACTIONS.items()},
                  introduced={"action": ids[-1], "at": introduce_at},
                  segments=list(NEW_BONUS_SEGMENTS))
    return s
