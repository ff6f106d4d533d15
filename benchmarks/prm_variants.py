"""Which PRM verifies? PRM_0 trained on a ReST-MCTS* run's warm-up data in several forms, each measured on the
solutions it was trained on and on held-out samples.

    python benchmarks/prm_variants.py --run runs/rest_mcts_arith_tiny [--problems 128] [--output rows.json]

Takes the run's policy_0 (models/policy_0), its config and its trace store's warm-up traces (the rollout-labelled
solutions PRM_0 trains on), and trains a PRM from policy_0 on them with the run's `prm_train` settings in each form
below. Prints per form: AUC on its own training solutions (correct against incorrect), AUC on policy_0's samples of
the held-out problems, and best-of-N and weighted vote over those samples beside self-consistency, random pick and
pass@N (the same samples for every form; scores read at the last step, as the run reads them). A form that fits its
training solutions far better than held-out ones has learned the training problems rather than how to check a step.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import machine
import numpy as np
from rest_mcts_run import held_out

from jaxreason.algorithms.model_states import value_model_from, value_parameters
from jaxreason.data.batching import shuffled_batches
from jaxreason.data.trace_batches import value_batch
from jaxreason.data.trace_store import FLAG_CORRECT, FLAG_ROLLOUT, TraceStore
from jaxreason.models.pretrained import load_pretrained
from jaxreason.sampling.prompts import pad_token_id
from jaxreason.sharding import make_mesh
from jaxreason.train.fit import fit
from jaxreason.train.objectives import value_objective
from jaxreason.verifiers import ValueVerifier
from jaxreason.verifiers.evaluation import evaluate_verifier
from jaxreason.verifiers.metrics import roc_auc

# name: (reads the likelihood, trains the backbone, LM term weight, trains at all)
FORMS = {
    "value head, whole model trained (the paper's)": (False, True, 0.0, True),
    "value head, backbone frozen": (False, False, 0.0, True),
    "likelihood alone (untrained)": (True, False, 0.0, False),
    "likelihood + value head, whole model trained, LM term 1": (True, True, 1.0, True),
    "likelihood + value head, backbone frozen": (True, False, 0.0, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a `jaxreason train` run folder (algorithm rest_mcts)")
    parser.add_argument("--problems", type=int, default=128, help="held-out problems (the run's first ones)")
    parser.add_argument("--output", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    print(machine.header(), flush=True)

    run_dir = Path(args.run)
    config, task, problems = held_out(run_dir, args.problems)
    policy, tokenizer = load_pretrained(run_dir / "models" / "policy_0")
    store = TraceStore(run_dir / "traces")
    traces = store.read(store.select(iteration=0, flags_all=FLAG_ROLLOUT))
    whole = [t for t in traces if np.isnan(t.step_values[:-1]).all()]  # labelled whole solutions
    pad = pad_token_id(tokenizer)
    mesh = make_mesh(devices=jax.devices()[:1])
    fit_config = config.prm_train.for_examples(len(traces))
    ev, n = config.evaluation, max(config.evaluation.verification.sizes)

    rows = []
    for name, (likelihood, backbone, lm_weight, trains) in FORMS.items():
        prm = value_model_from(policy, config.seed, likelihood=likelihood)
        if not trains:
            prm.head[...] = jnp.zeros_like(prm.head[...])  # the value is the likelihood term alone
        else:
            batches = shuffled_batches(
                lambda idx: value_batch([traces[i] for i in idx], fit_config.max_len, pad, lm_mask=lm_weight > 0),
                len(traces), fit_config.batch_size, config.seed)
            with tempfile.TemporaryDirectory() as directory:
                fit(prm, value_objective(config.prm_loss, lm_weight), batches, fit_config, mesh=mesh,
                    directory=directory, seed=config.seed, description="prm", trainable=value_parameters(backbone))
        batch = value_batch(whole, fit_config.max_len, pad)
        values = np.asarray(prm.values(jnp.asarray(batch["tokens"]), jnp.asarray(batch["attention_mask"]),
                                       jnp.asarray(batch["solution_start"])))
        last = values[np.arange(len(whole)), [t.step_ends[-1] - 1 for t in whole]]
        quality = evaluate_verifier(policy, ValueVerifier(prm, aggregation="last"), tokenizer, task, problems,
                                    sampling=ev.baseline.sampling, num_samples=ev.verification.num_samples,
                                    sizes=(n,), key=jax.random.key(0), chat=config.chat)
        selection = quality["selection"][str(n)]
        rows.append({"form": name, "train_auc": roc_auc(last, [bool(t.flags & FLAG_CORRECT) for t in whole]),
                     "heldout_auc": quality["auc"], **selection})
        print(f"{name}: train AUC {rows[-1]['train_auc']:.3f}, held-out AUC {quality['auc']:.3f}", flush=True)

    print(f"\n{len(whole)} labelled training solutions of {config.problems.warmup} warm-up problems; {len(problems)} "
          f"held-out problems, {ev.verification.num_samples} samples each\n")
    print(f"| PRM | AUC on its training solutions | held-out AUC | best-of-{n} | weighted vote@{n} | "
          f"self-consistency@{n} | random pick | pass@{n} |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['form']} | {r['train_auc']:.3f} | {r['heldout_auc']:.3f} | {r['best_of_n']:.3f} | "
              f"{r['weighted_vote']:.3f} | {r['self_consistency']:.3f} | {r['random_pick']:.3f} | "
              f"{r['pass_at_n']:.3f} |")
    if args.output:
        Path(args.output).write_text(json.dumps({"machine": machine.describe(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
