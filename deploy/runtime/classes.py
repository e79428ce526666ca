"""The movement class decided at each decoder step, from a class head's scores.

A bundle whose model has a class head gives, after the finger positions, one
score per movement class (onnx_weights.RnnWeights: the sigmoid of each class's
logit, in ``class_names`` order).  Per decoded window::

    raw      = argmax(scores)                     the softmax's argmax too
    raw      = None  if max softmax probability < class_min_confidence
    decided  = the most frequent of the last class_vote_windows raw decisions
               (None counts as a vote; a tie goes to the most recent of the tied)

The softmax probabilities are recovered from the scores: a score ``s`` is
``sigmoid(l)`` of its logit ``l``, so ``l = log(s / (1 - s))`` (``s`` clipped
away from 0 and 1 first).  The defaults (1 window, confidence 0) decide the
argmax of every window, as ``neurohand evaluate`` scores it.

``None`` means "no class": what the hand is told while it is held in its safe
posture (writer.py) and after a low-confidence window; a key bound to a class
is never pressed for it.
"""
import collections
import math

#: Scores are clipped to [CLIP, 1 - CLIP] before their logits are taken (float32 sigmoids saturate).
CLIP = 1e-7


class ClassDecider(object):
    """Turns each window's class scores into a decided class index (or None).

    Parameters
    ----------
    class_names : sequence of str, the head's classes ("rest" first)
    vote_windows : int >= 1, majority over this many most recent windows
    min_confidence : float in 0..1, least softmax probability of the top class; 0 = off
    """

    def __init__(self, class_names, vote_windows=1, min_confidence=0.0):
        self.class_names = tuple(class_names)
        self.n_classes = len(self.class_names)
        self.vote_windows = int(vote_windows)
        self.min_confidence = float(min_confidence)
        self._recent = collections.deque(maxlen=self.vote_windows)
        self.decided = None

    def reset(self):
        """Forget the recent windows (the hand went to its safe posture: start afresh)."""
        self._recent.clear()
        self.decided = None

    def raw(self, scores):
        """The class of one window's ``scores`` alone (index, or None below the confidence)."""
        # A handful of floats: plain Python beats numpy's call overhead here.
        values = scores.tolist() if hasattr(scores, "tolist") else [float(s) for s in scores]
        best = max(range(len(values)), key=values.__getitem__)
        if self.min_confidence > 0.0 and confidence(values, best) < self.min_confidence:
            return None
        return best

    def decide(self, scores):
        """Decide the class after a window with these ``scores`` (length n_classes)."""
        self._recent.append(self.raw(scores))
        if self.vote_windows == 1:
            self.decided = self._recent[-1]
            return self.decided
        counts = {}
        for vote in self._recent:
            counts[vote] = counts.get(vote, 0) + 1
        top = max(counts.values())
        for vote in reversed(self._recent):
            if counts[vote] == top:
                self.decided = vote
                break
        return self.decided


def confidence(scores, index):
    """Softmax probability of class ``index`` from sigmoid ``scores`` (see the module docstring)."""
    logits = []
    for s in scores:
        s = min(max(float(s), CLIP), 1.0 - CLIP)
        logits.append(math.log(s / (1.0 - s)))
    top = max(logits)
    total = sum(math.exp(l - top) for l in logits)
    return math.exp(logits[index] - top) / total


def class_name(class_names, index):
    """Display name of a decided class ``index`` of ``class_names`` ("none" for None)."""
    return "none" if index is None else class_names[index]
