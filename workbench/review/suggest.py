"""Which unlabelled studies would teach the model most: a ranked labelling worklist.

Active learning, pool-based: every unlabelled study of a cohort is run through the model (or
several, for ``ensemble-disagreement``), scored by how unsure the model is, and a batch of
``n`` is chosen that is both uncertain and diverse, so that a clinician's reads are not spent
on ten near-copies of one hard case. The scores and the diversity step are scikit-activeml's
(``uncertainty_scores``, ``CoreSet``): a well-kept library made for this.

Strategies (higher score: more worth a read):

* ``entropy``: the entropy of the calibrated probabilities (sigmoid models: the sum over
  labels of each label's binary entropy);
* ``margin``: one minus the gap between the two most probable classes (sigmoid models: the sum
  over labels of one minus |2p - 1|);
* ``set-size``: the size of the bundle's conformal prediction set (sigmoid models: the labels
  left "uncertain"), ties broken by entropy; needs a bundle that ships a conformal predictor;
* ``ensemble-disagreement``: the mutual information between the members' predictions and the
  ensemble's, H(mean p) - mean H(p) (BALD over an ensemble); needs two models or more;
* ``coreset``: diversity alone (k-center greedy, Sener & Savarese 2018).

Diversity: except for ``coreset``, the ``pool_factor`` x ``n`` most uncertain studies form a
pool, and k-center greedy on the model's study embeddings picks ``n`` of them one at a time,
each the farthest from everything labelled so far: the model's own training studies (its
similar-case index), the cohort's labelled studies and the picks before it. The list's order is
the order of the picks.

The worklist is written to ``HOME/suggestions/COHORT.json`` (study keys only, never UIDs) and
its creation is an audit event.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from skactiveml.pool import CoreSet, uncertainty_scores

from workbench.catalog.cohorts import CohortItem, cohort_items
from workbench.config import Settings
from workbench.db.store import record_audit, session_scope
from workbench.errors import NotFoundError, UsageError
from workbench.model.bundle import Bundle
from workbench.model.data import make_dataset, to_records
from workbench.model.runtime import forward_dataset, mean_by_study, resolve_precision
from workbench.posthoc.conformal import ConformalSets, MultiLabelConformal, study_uniform
from workbench.posthoc.similar import normalise
from workbench.predict.inference import predict_items
from workbench.predict.results import latest_predictions
from workbench.predict.trust import load_trust
from workbench.review.worklist import STRATEGIES, Suggestion, Worklist, worklist_path

#: The uncertainty pool that the diversity step chooses from, as a multiple of ``n``.
POOL_FACTOR = 3


@dataclass(frozen=True)
class StudyOutputs:
    """One model's study-level outputs: calibrated probabilities (S, K) and L2-normalised
    embeddings (S, F), in the order of ``study_ids``."""

    study_ids: np.ndarray
    probs: np.ndarray
    embeddings: np.ndarray


def study_outputs(
    bundle: Bundle, items: Sequence[CohortItem], precision: str = "auto"
) -> StudyOutputs:
    """Run ``bundle`` over the studies: the mean logit of each study's inputs, calibrated by
    the map of the study's site, and the mean embedding. No saliency, nothing stored."""
    if not items:
        return StudyOutputs(np.zeros(0, np.int64), np.zeros((0, 0)), np.zeros((0, 0)))
    model = bundle.network
    device = next(model.parameters()).device
    prec = resolve_precision(precision, device, bundle.spec.spatial_dims, training=False)
    dataset = make_dataset(to_records(items, bundle.classes), bundle.spec, train=False)
    out = forward_dataset(model, dataset, device, prec, bundle.spec.spatial_dims)
    ids, logits = mean_by_study(out["study_ids"], out["logits"])
    _, embeddings = mean_by_study(out["study_ids"], out["embeddings"])
    site_of = {i.study_id: i.site for i in items}
    probs = np.empty(logits.shape, dtype=np.float64)
    for row, study_id in enumerate(ids):
        calibration, _ = bundle.calibration_for(site_of.get(int(study_id)))
        probs[row] = calibration.apply(logits[row : row + 1])[0]
    return StudyOutputs(np.asarray(ids, np.int64), probs, normalise(embeddings))


def _binary(p: np.ndarray) -> np.ndarray:
    """(S, K) sigmoid probabilities as K binary problems: (S, K, 2)."""
    return np.stack([1.0 - p, p], axis=-1)


def _entropy(probs: np.ndarray, sigmoid: bool) -> np.ndarray:
    if not sigmoid:
        return np.asarray(uncertainty_scores(probs, method="entropy"))
    per_label = [
        uncertainty_scores(_binary(probs[:, j]), method="entropy") for j in range(probs.shape[1])
    ]
    return np.sum(per_label, axis=0)


def uncertainty(
    members: Sequence[np.ndarray],
    strategy: str,
    sigmoid: bool,
    set_sizes: np.ndarray | None = None,
) -> np.ndarray:
    """Per study, how unsure the model(s) are under ``strategy`` (higher: more unsure).

    ``members``: each model's (S, K) calibrated probabilities for the same studies (one array
    for a single model). ``set_sizes``: the conformal set size of each study (``set-size``).
    """
    if strategy not in STRATEGIES:
        raise UsageError(f"--strategy must be one of {', '.join(STRATEGIES)}")
    mean = np.mean(np.stack(members), axis=0)
    if strategy == "coreset":
        return np.zeros(len(mean))
    if strategy == "entropy":
        return _entropy(mean, sigmoid)
    if strategy == "margin":
        if not sigmoid:
            return np.asarray(uncertainty_scores(mean, method="margin_sampling"))
        return np.sum(1.0 - np.abs(2.0 * mean - 1.0), axis=1)
    if strategy == "set-size":
        if set_sizes is None:
            raise UsageError("--strategy set-size needs a model that ships conformal sets")
        # ties (most studies share a size) go to the higher entropy, which never reaches 1 per
        # label or class once scaled
        scale = np.log(2) * mean.shape[1] if sigmoid else np.log(max(2, mean.shape[1]))
        return np.asarray(set_sizes, np.float64) + 0.999 * _entropy(mean, sigmoid) / scale
    if len(members) < 2:
        raise UsageError("--strategy ensemble-disagreement needs two models or more (--model)")
    return _entropy(mean, sigmoid) - np.mean([_entropy(p, sigmoid) for p in members], axis=0)


def diverse_order(
    scores: np.ndarray,
    embeddings: np.ndarray,
    labelled: np.ndarray,
    n: int,
    pool_factor: int = POOL_FACTOR,
    random_state: int = 0,
    diversity_only: bool = False,
) -> list[int]:
    """Indices of ``n`` candidates (rows of ``embeddings``) in pick order: from the
    ``pool_factor * n`` highest ``scores`` (all candidates when ``diversity_only``), k-center
    greedy, each pick the farthest from the ``labelled`` embeddings and the earlier picks."""
    total = len(scores)
    n = min(n, total)
    if n <= 0:
        return []
    if diversity_only:
        pool = np.arange(total)
    else:
        # highest score first; equal scores keep the candidates' order (stable)
        pool = np.argsort(-np.asarray(scores), kind="stable")[: max(n, pool_factor * n)]
    labelled = labelled.reshape(-1, embeddings.shape[1]) if len(labelled) else labelled
    X = np.concatenate([labelled, embeddings]) if len(labelled) else embeddings
    y = np.full(len(X), np.nan)
    y[: len(labelled)] = 0  # "labelled": the class is irrelevant to k-center greedy
    picks = CoreSet(random_state=random_state).query(
        X, y, candidates=pool + len(labelled), batch_size=n
    )
    return [int(i) - len(labelled) for i in picks]


def _set_sizes(bundle: Bundle, keys: Sequence[str], probs: np.ndarray) -> np.ndarray | None:
    trust = load_trust(bundle.path, bundle.contract.trust)
    if trust is None or trust.conformal is None:
        return None
    u = np.array([study_uniform(k) for k in keys])
    if isinstance(trust.conformal, MultiLabelConformal):
        calls = trust.conformal.apply(probs, u)
        return np.array([sum(v == "uncertain" for v in c.values()) for c in calls])
    assert isinstance(trust.conformal, ConformalSets)
    return np.array([len(s) for s in trust.conformal.apply(probs, u)])


def _training_embeddings(bundle: Bundle) -> np.ndarray:
    """The model's own training studies (its similar-case index), when the bundle ships one."""
    trust = load_trust(bundle.path, bundle.contract.trust)
    return np.zeros((0, 0), np.float32) if trust is None else trust.index.embeddings_


def suggest(
    settings: Settings,
    cohort: str,
    n: int,
    models: Sequence[Bundle],
    strategy: str = "entropy",
    pool_factor: int = POOL_FACTOR,
    seed: int = 0,
    actor: str = "cli",
) -> Worklist:
    """Rank the cohort's unlabelled studies for reading and store the worklist (see the
    module docstring). ``models``: one bundle, or the members of an ensemble."""
    if not models:
        raise UsageError("suggest needs a model")
    if strategy not in STRATEGIES:
        raise UsageError(f"--strategy must be one of {', '.join(STRATEGIES)}")
    if n < 1 or pool_factor < 1:
        raise UsageError("--n and --pool-factor must be at least 1")
    first = models[0]
    for other in models[1:]:
        if other.classes != first.classes or other.spec.spatial_dims != first.spec.spatial_dims:
            raise UsageError(
                f"{other.name}/{other.version} has other classes or input shape than "
                f"{first.name}/{first.version}: not one ensemble"
            )
    items = [i for i in cohort_items(settings, cohort) if i.images]
    if not items:
        raise NotFoundError(f"cohort {cohort!r} has no studies with usable images")
    shaped = [i for i in items if i.spatial_dims == first.spec.spatial_dims]
    unlabelled = [i for i in shaped if not i.label]
    labelled = [i for i in shaped if i.label]
    if not unlabelled:
        raise NotFoundError(f"cohort {cohort!r} has no unlabelled study this model can read")
    outputs = [study_outputs(m, unlabelled, settings.precision) for m in models]
    order = {int(s): r for r, s in enumerate(outputs[0].study_ids)}
    by_id = {i.study_id: i for i in unlabelled}
    keys = [by_id[int(s)].study_key for s in outputs[0].study_ids]
    members = [o.probs[[order[int(s)] for s in o.study_ids]] for o in outputs]
    sigmoid = first.contract.sigmoid
    mean = np.mean(np.stack(members), axis=0)
    sizes = _set_sizes(first, keys, mean)
    scores = uncertainty(members, strategy, sigmoid, sizes)
    reference = [_training_embeddings(first)]
    if labelled:
        reference.append(study_outputs(first, labelled, settings.precision).embeddings)
    seen = (
        np.concatenate([r for r in reference if r.size])
        if any(r.size for r in reference)
        else np.zeros((0, 0))
    )
    picks = diverse_order(
        scores, outputs[0].embeddings, seen, n, pool_factor, seed, strategy == "coreset"
    )
    # The picks are predicted and stored (no heat map: the labelling page shows the model's
    # output only on request), so that reads attach to a prediction as reviews do.
    picked = [by_id[int(outputs[0].study_ids[i])] for i in picks]
    predict_items(settings, first, picked, explain="none", progress=False)
    stored = latest_predictions(settings, first.bundle_hash, [i.study_id for i in picked])
    suggestions = tuple(
        Suggestion(
            rank=rank + 1,
            study_key=keys[i],
            score=round(float(scores[i]), 6),
            predicted=_predicted(first, mean[i], sigmoid),
            set_size=None if sizes is None else int(sizes[i]),
            prediction_id=stored[item.study_id].id if item.study_id in stored else None,
        )
        for rank, (i, item) in enumerate(zip(picks, picked, strict=True))
    )
    worklist = Worklist(
        cohort=cohort,
        models=tuple(f"{m.name}/{m.version}" for m in models),
        strategy=strategy,
        n_unlabelled=len(unlabelled),
        n_labelled_reference=len(seen),
        suggestions=suggestions,
        classes=first.classes,
        multilabel=sigmoid,
        negative_class=first.negative_class if sigmoid else None,
    )
    path = worklist_path(settings, cohort)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(worklist.to_dict(), indent=2), encoding="utf-8")
    tmp.replace(path)
    with session_scope(settings.database_url) as session:
        record_audit(
            session,
            actor,
            "suggest.worklist",
            "cohort",
            cohort,
            new_value={
                "strategy": strategy,
                "models": list(worklist.models),
                "n": len(suggestions),
                "studies": [s.study_key for s in suggestions],
            },
        )
    return worklist


def _predicted(bundle: Bundle, probs: np.ndarray, sigmoid: bool) -> str:
    if not sigmoid:
        return bundle.classes[int(np.argmax(probs))]
    thresholds = bundle.thresholds or [0.5] * len(bundle.classes)
    found = [c for c, p, t in zip(bundle.classes, probs, thresholds, strict=True) if p >= t]
    return ";".join(found) or (bundle.negative_class or "none")
