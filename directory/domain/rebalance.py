"""Rebalance and drain planning: pure functions from load data to a list of moves.

Load model (the contract's default): a room weighs ``1 + live connections``;
an active instance's *share* of the total load is proportional to its
capacity, and its *ratio* is load / share. Balanced means every active
instance's ratio is within ``1 +- tolerance``.

Only ``active`` instances take part: rooms on ``draining`` instances are the
drain's business, rooms on ``down`` ones are re-placed when a client next
connects, and ``disabled`` ones hold none.

Algorithm of :func:`plan` (greedy on a violation measure)
--------------------------------------------------------
Let the *violation* V be the sum over active instances of how far each one
is outside its band (load above ``hi`` or below ``lo``). A move of a room of
weight w from s to d, allowed only when s stays >= lo_s and d stays <= hi_d,
never creates a violation and lowers V by ``min(w, excess_s) +
min(w, deficit_d)``. Each step takes the worst violator (the most
overloaded instance if any, else the most underloaded), tries every partner
on the other side, and on each partner picks by bisection the room that
lowers V the most (the smallest room covering both gaps, else the largest
that fits), preferring the smaller room on ties. V strictly decreases, so the
loop ends; it also stops at ``max_moves`` or when no violator can be helped.
A moved room never moves again in the same plan.

Lower bound (:func:`lower_bound`): moves are counted per instance on each
side, and no instance can give away more than its slack net (rooms it
receives back cost moves too), so covering the total deficit or excess takes
at least as many moves as the bounds there compute.

Cost: O(R log R) to sort, then O(I log R) per move (I instances, R rooms).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Iterable, Mapping
from itertools import groupby, pairwise
from typing import Any

DEFAULT_TOLERANCE = 0.10
DEFAULT_MAX_MOVES = 100
ACTIVE = "active"
_EPS = 1e-9
# Partners tried per move of an overloaded instance: the most headroom (admits the
# largest room) and the most deficit (fixed the most). Trying all of them is O(I)
# picks per move; these few carry the best gain, which keeps 1,000 instances fast.
_CANDIDATES = 8


def _stats(load: Mapping[str, float], share: Mapping[str, float]) -> dict[str, dict[str, float]]:
    return {i: {"load": load[i], "share": round(share[i], 3),
                "ratio": round(load[i] / share[i], 4) if share[i] > 0 else 0.0}
            for i in sorted(load, key=_instance_key)}


def _instance_key(iid: str) -> tuple[int, str]:
    return (int(iid[1:]), iid) if iid[1:].isdigit() else (1 << 30, iid)


def _pick(weights: list[float], want: float, limit: float) -> int:
    """Index of the smallest weight >= want that is <= limit, else of the largest <= limit; -1."""
    top = bisect.bisect_right(weights, limit + _EPS) - 1
    if top < 0:
        return -1
    at = bisect.bisect_left(weights, want - _EPS)
    return min(at, top)


def plan(instances: Iterable[Mapping[str, Any]], rooms: Iterable[Mapping[str, Any]], *,
         tolerance: float = DEFAULT_TOLERANCE, max_moves: int = DEFAULT_MAX_MOVES) -> dict[str, Any]:
    """The fewest moves (greedy, see the module doc) that balance the active instances.

    ``instances``: ``{"id", "capacity", "state"}``; ``rooms``: ``{"room",
    "instance", "weight"}`` (weight = 1 + live connections). Returns
    ``{"moves": [{"room", "from", "to"}], "before", "after", "lower_bound",
    "balanced", "tolerance"}`` where before/after map each active instance to
    ``{"load", "share", "ratio"}``. Raises ValueError on a negative tolerance
    or max_moves, or a room weight <= 0.
    """
    if tolerance < 0 or max_moves < 0:
        raise ValueError("tolerance and max_moves must not be negative")
    cap = {i["id"]: float(i["capacity"]) for i in instances
           if i.get("state") == ACTIVE and i["capacity"] > 0}
    per: dict[str, list[tuple[float, str]]] = {i: [] for i in cap}
    for r in rooms:
        bucket = per.get(r["instance"])
        if bucket is not None:
            w = r["weight"]
            if w <= 0:
                raise ValueError(f"room {r['room']} has weight {w}; weights are 1 + connections")
            bucket.append((w, r["room"]))
    weights: dict[str, list[float]] = {}
    names: dict[str, list[str]] = {}
    load: dict[str, float] = {}
    for i, bucket in per.items():
        bucket.sort()
        weights[i] = [w for w, _ in bucket]
        names[i] = [n for _, n in bucket]
        load[i] = sum(weights[i])
    total, total_cap = sum(load.values()), sum(cap.values())
    share = {i: (total * cap[i] / total_cap if total_cap else 0.0) for i in cap}
    lo = {i: (1 - tolerance) * share[i] for i in cap}
    hi = {i: (1 + tolerance) * share[i] for i in cap}
    before = _stats(load, share)
    bound = lower_bound(weights, load, lo, hi)

    moves: list[dict[str, str]] = []
    # Lazy max-heaps keyed on the current load (stale entries are dropped when met;
    # both ends of every move are pushed again). Nobody becomes over- or
    # underloaded during a plan, so those two heaps only shrink.
    over = _LazyTop(lambda i: (load[i] - hi[i]) / max(share[i], _EPS), cap)
    under = _LazyTop(lambda i: (lo[i] - load[i]) / max(share[i], _EPS), cap)
    roomy = _LazyTop(lambda i: hi[i] - load[i], cap)
    short = _LazyTop(lambda i: lo[i] - load[i], cap)
    while len(moves) < max_moves and total > 0:
        best: tuple[float, float, str, str, int] | None = None  # (-gain, w, src, dst, index)
        worst = over.top(1, lambda i: load[i] > hi[i] + _EPS)
        if worst:
            src = violator = worst[0]
            excess, room_left = load[src] - hi[src], load[src] - lo[src]
            def takes(i: str, src: str = src) -> bool:
                return i != src and load[i] < hi[i] - _EPS

            for dst in set(roomy.top(_CANDIDATES, takes)) | set(short.top(_CANDIDATES, takes)):
                deficit = max(0.0, lo[dst] - load[dst])
                k = _pick(weights[src], max(excess, deficit), min(room_left, hi[dst] - load[dst]))
                if k >= 0:
                    w = weights[src][k]
                    cand = (-(min(w, excess) + min(w, deficit)), w, src, dst, k)
                    best = cand if best is None or cand < best else best
        else:
            neediest = under.top(1, lambda i: load[i] < lo[i] - _EPS)
            if not neediest:
                break
            dst = violator = neediest[0]
            deficit, headroom = lo[dst] - load[dst], hi[dst] - load[dst]
            # Every donor is tried: the room that covers the deficit best may sit anywhere.
            for src in cap:
                if src == dst or load[src] <= lo[src] + _EPS:
                    continue
                k = _pick(weights[src], deficit, min(load[src] - lo[src], headroom))
                if k >= 0:
                    w = weights[src][k]
                    cand = (-min(w, deficit), w, src, dst, k)
                    best = cand if best is None or cand < best else best
        if best is None or best[0] >= 0:
            (over if worst else under).drop(violator)  # nothing fits: fix what can be fixed
            continue
        _, w, src, dst, k = best
        weights[src].pop(k)
        room = names[src].pop(k)
        load[src] -= w
        load[dst] += w  # not added to dst's list: a moved room stays put in this plan
        moves.append({"room": room, "from": src, "to": dst})
        for heap in (over, under, roomy, short):
            heap.push(src)
            heap.push(dst)

    balanced = all(lo[i] - _EPS <= load[i] <= hi[i] + _EPS for i in cap)
    return {"moves": moves, "before": before, "after": _stats(load, share),
            "lower_bound": bound, "balanced": balanced, "tolerance": tolerance}


class _LazyTop:
    """Instances by a key that changes as loads move: a max-heap with lazy deletion."""

    def __init__(self, key: Callable[[str], float], ids: Iterable[str]) -> None:
        self.key = key
        self.heap = [(-key(i), i) for i in ids]
        self.dropped: set[str] = set()
        heapq.heapify(self.heap)

    def push(self, i: str) -> None:
        if i not in self.dropped:
            heapq.heappush(self.heap, (-self.key(i), i))

    def drop(self, i: str) -> None:
        self.dropped.add(i)

    def top(self, n: int, valid: Callable[[str], bool]) -> list[str]:
        """Up to ``n`` highest-keyed instances passing ``valid``, highest first.

        Entries whose key is stale are discarded (a fresh one was pushed when
        the load changed); entries failing ``valid`` are kept for later.
        """
        out: list[str] = []
        keep: list[tuple[float, str]] = []
        seen: set[str] = set()
        heap = self.heap
        while heap and len(out) < n:
            entry = heapq.heappop(heap)
            neg, i = entry
            if i in seen or i in self.dropped or -neg != self.key(i):
                continue
            seen.add(i)
            keep.append(entry)
            if valid(i):
                out.append(i)
            elif -neg <= 0 and n == 1:
                break  # for the over/under heaps a non-positive key ends the search
        for entry in keep:
            heapq.heappush(heap, entry)
        return out


def lower_bound(weights: Mapping[str, list[float]], load: Mapping[str, float],
                lo: Mapping[str, float], hi: Mapping[str, float]) -> int:
    """A number of moves no plan can beat (see the module doc); weights sorted ascending.

    The largest of three valid bounds: (1) each overloaded instance loses at
    least the count of its largest rooms covering its excess; (2) each
    underloaded one gains at least the count of the cluster's largest rooms
    covering its deficit; (3) the total deficit D must leave the other
    instances, and an instance h can give away at most its slack
    ``load_h - lo_h`` net, however it is refilled, so its k-th room adds at
    most ``min(slack, top k) - min(slack, top k-1)`` -- the fewest such
    contributions covering D; and symmetrically for the total excess against
    the headroom ``hi - load`` of the others.
    """
    out_moves = 0
    for i, ws in weights.items():
        excess = load[i] - hi[i]
        if excess > _EPS:
            out_moves += _cover_count([list(reversed(ws))], [float("inf")], excess)
    deficits = {i: lo[i] - load[i] for i in load if lo[i] - load[i] > _EPS}
    excesses = {i: load[i] - hi[i] for i in load if load[i] - hi[i] > _EPS}
    if not deficits and not excesses:
        return out_moves
    biggest = sorted((w for ws in weights.values() for w in ws), reverse=True)
    in_moves = sum(_cover_count([biggest], [float("inf")], d) for d in deficits.values())
    donors = [i for i in load if i not in deficits and load[i] - lo[i] > _EPS]
    donor_rooms = [list(reversed(weights[i])) for i in donors]
    slacks = [load[i] - lo[i] for i in donors]
    need = sum(deficits.values())
    by_slack = max(_cover_count(donor_rooms, slacks, need),
                   _slack_bound(donor_rooms, slacks, need))
    takers = [i for i in load if i not in excesses and hi[i] - load[i] > _EPS]
    by_room = _cover_count([biggest] * len(takers), [hi[i] - load[i] for i in takers],
                           sum(excesses.values()))
    return max(out_moves, in_moves, by_slack, by_room)


def _slack_bound(rooms_desc: list[list[float]], slacks: list[float], need: float) -> int:
    """Fewest moves that can bring ``need`` into the underloaded instances from donors.

    Donor h has slack s = load - lo. Its rooms that reach the underloaded
    instances form a set S_h; if their total exceeds s, h must itself take
    in at least one room (one more move, into h, counted nowhere else). So t
    moves charged to h bring at most V(t) = max(min(s, P'_t), P_{t-1}),
    where P is the prefix sum of its rooms largest first and P' the same
    over its rooms of weight <= s. Replacing each V by its concave hull only
    raises what k moves can bring, and for concave values the best k moves
    overall are the k best hull slopes, taken greedily: a valid lower bound.
    """
    if need <= _EPS:
        return 0
    units: list[tuple[float, int]] = []  # (slope, how many moves at that slope)
    for ws, s in zip(rooms_desc, slacks):
        small = [w for w in ws if w <= s + _EPS]
        hull: list[tuple[int, float]] = [(0, 0.0)]  # upper concave hull of (t, V(t))
        p_all = p_small = 0.0
        t = 0
        while t < len(ws):
            t += 1
            prev_all = p_all
            p_all += ws[t - 1]
            if t <= len(small):
                p_small += small[t - 1]
            pt = (t, max(min(s, p_small), prev_all))
            while len(hull) >= 2 and _cross(hull[-2], hull[-1], pt) >= 0:
                hull.pop()
            hull.append(pt)
            if pt[1] >= need:
                break
            # Once P_{t-1} >= s, V(t+k) = P_{t+k-1}: the slopes are the room weights
            # themselves, already decreasing; once the next is no steeper than the hull's
            # last segment the rest of the hull is those rooms, one unit each.
            if prev_all >= s and len(hull) >= 2 and t < len(ws):
                (t0, v0), (t1, v1) = hull[-2], hull[-1]
                if ws[t - 1] <= (v1 - v0) / (t1 - t0):
                    for w, same in groupby(ws[t - 1:]):
                        units.append((w, sum(1 for _ in same)))
                    break
        for (t0, v0), (t1, v1) in pairwise(hull):
            if v1 > v0:
                units.append(((v1 - v0) / (t1 - t0), t1 - t0))
    units.sort(reverse=True)
    count, covered = 0, 0.0
    for slope, n in units:
        if covered + slope * n >= need - _EPS:
            return count + max(1, -int(-(need - covered - _EPS) // slope))
        covered += slope * n
        count += n
    return count


def _cross(o: tuple[int, float], a: tuple[int, float], b: tuple[int, float]) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _cover_count(rooms_desc: list[list[float]], caps: list[float], need: float) -> int:
    """Fewest picks covering ``need`` when source k's j-th room adds
    ``min(cap_k, top j) - min(cap_k, top j-1)`` (concave per source, so greedy is exact).

    When even every room cannot cover ``need``, returns the picks that help.
    """
    if need <= _EPS:
        return 0
    heap: list[tuple[float, int, int, float]] = []  # (-gain, source, next index, taken so far)
    for k, ws in enumerate(rooms_desc):
        if ws and caps[k] > _EPS:
            heap.append((-min(caps[k], ws[0]), k, 1, 0.0))
    heapq.heapify(heap)
    count, covered = 0, 0.0
    while heap and covered < need - _EPS:
        neg, k, j, taken = heapq.heappop(heap)
        covered -= neg
        count += 1
        taken -= neg
        ws = rooms_desc[k]
        if j < len(ws) and taken < caps[k] - _EPS:
            gain = min(caps[k] - taken, ws[j])
            heapq.heappush(heap, (-gain, k, j + 1, taken))
    return count


def plan_drain(instances: Iterable[Mapping[str, Any]], rooms: Iterable[Mapping[str, Any]],
               source: str) -> list[dict[str, Any]]:
    """Where each room of a draining instance goes, in the order to move them.

    ``instances``: ``{"id", "capacity", "state", "load"}`` (load = assigned
    rooms + connections); ``rooms``: ``{"room", "weight"}`` on ``source``.
    Largest rooms first (they pause the most clients, and placing them while
    the targets are emptiest balances best), each to the active instance
    with the lowest load/capacity after taking it (ties: lowest instance
    number). Returns ``[{"room", "to", "weight"}]``; raises ValueError when
    no other instance is active.
    """
    heap = [((float(i["load"]) / i["capacity"]), _instance_key(i["id"]), i["id"],
             float(i["load"]), float(i["capacity"]))
            for i in instances
            if i.get("state") == ACTIVE and i["id"] != source and i["capacity"] > 0]
    if not heap:
        raise ValueError(f"no active instance to drain {source} to")
    heapq.heapify(heap)
    out = []
    for r in sorted(rooms, key=lambda r: (-r["weight"], r["room"])):
        _, key, iid, ld, c = heapq.heappop(heap)
        ld += r["weight"]
        heapq.heappush(heap, (ld / c, key, iid, ld, c))
        out.append({"room": r["room"], "to": iid, "weight": r["weight"]})
    return out
