"""lmms-eval's own POPE and MME task code, run on our bundled documents and fixed answers, gives exactly
the numbers eval.py reports under lmms-eval's metric names (skipped without the optional lmms-eval extra)."""

from collections import defaultdict
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is an optional extra (requirements-eval.txt)")

from data.bundled.benchmark import BENCH_DATASETS  # noqa: E402
from mm.config import EvalConfig  # noqa: E402
from mm.eval.harness import EvalContext, aggregate  # noqa: E402
from mm.eval.taskfile import load_tasks  # noqa: E402

# yes/no in several spellings, sentences, a digit, an empty answer, other words
ODD = ["Yes", "No.", "yes.", "Yes, there is a 3 in the image.", "There is not.", "3", "", "maybe", " no ", "y", "n",
       "NO", "Nope", "no, it is not"]  # fmt: skip


def _answers(docs: list[dict]) -> list[str]:
    """Fixed answers: right for some documents, wrong for others, odd spellings for the rest."""
    out = []
    for i, d in enumerate(docs):
        if i % 3 == 0:
            out.append(d["answer"])
        elif i % 5 == 1:
            out.append("no" if d["answer"] == "yes" else "yes")
        else:
            out.append(ODD[i % len(ODD)])
    return out


def _lmms_task(name: str) -> dict:
    """lmms-eval's own task file, loaded by lmms-eval (its !function tags resolve to its utils.py)."""
    import lmms_eval
    from lmms_eval.utils import load_yaml_config

    return load_yaml_config(str(Path(lmms_eval.__file__).parent / "tasks" / name / f"{name}.yaml"), mode="full")


def _theirs(cfg: dict, docs: list[dict], answers: list[str]) -> dict[str, float]:
    """lmms-eval's process_results per document, then each metric's aggregation over the documents that gave it."""
    per_metric = defaultdict(list)
    for doc, a in zip(docs, answers):
        for k, v in cfg["process_results"](doc, [a]).items():
            per_metric[k].append(v)
    aggs = {m["metric"]: m["aggregation"] for m in cfg["metric_list"]}
    return {k: aggs[k](v) for k, v in per_metric.items()}


def _ours(task_name: str, docs: list[dict], answers: list[str], tmp_path: Path) -> dict:
    """What eval.py reports: our task file's process_results and the harness's aggregation."""
    task = load_tasks([task_name])[0]
    per_doc = [task.process_results(doc, [a]) for doc, a in zip(docs, answers)]
    return aggregate(task, per_doc, EvalContext(task_name, tmp_path, EvalConfig(), 0))


@pytest.fixture(scope="module")
def pope_docs() -> dict[str, list[dict]]:
    return BENCH_DATASETS["digits_pope"](0)


@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
@pytest.mark.parametrize("answers", ["mixed", "never_yes_or_no"])
def test_pope_under_lmms_eval_names_equals_lmms_eval(pope_docs, split, answers, tmp_path):
    docs = pope_docs[split]
    preds = _answers(docs) if answers == "mixed" else ["maybe"] * len(docs)  # 0/0 precision and recall: both 0
    theirs = _theirs(_lmms_task("pope"), docs, preds)
    ours = _ours(f"digits_pope_{split}", docs, preds, tmp_path)
    assert set(theirs) == {"pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio"}
    assert {k: ours[k] for k in theirs} == theirs  # exactly, float for float
    if answers == "mixed":
        assert 0 < theirs["pope_accuracy"] < 1 and 0 < theirs["pope_f1_score"] < 1
        # same answers, POPE's own rule: a sentence, a digit or an empty answer counts as yes
        assert ours["pope_orig_accuracy"] != ours["pope_accuracy"]
        assert ours["pope_orig_predicted_yes_ratio"] != ours["pope_yes_ratio"] == 0.5  # predicted vs labelled yes


@pytest.fixture(scope="module")
def mme_docs() -> list[dict]:
    return BENCH_DATASETS["digits_mme"](0)["test"]


def test_mme_under_lmms_eval_names_equals_lmms_eval(mme_docs, tmp_path):
    preds = _answers(mme_docs)
    theirs = _theirs(_lmms_task("mme"), mme_docs, preds)
    ours = _ours("digits_mme", mme_docs, preds, tmp_path)
    assert set(theirs) == {"mme_perception_score", "mme_cognition_score"}
    assert {k: ours[k] for k in theirs} == theirs
    # lmms-eval puts every category outside its perception list in cognition: here recognition alone
    assert ours["mme_cognition_score"] == ours["mme_recognition_score"]
    perception = ours["mme_existence_score"] + ours["mme_count_score"] + ours["mme_position_score"]
    assert ours["mme_perception_score"] == pytest.approx(perception)
    assert ours["mme_total_score"] == pytest.approx(ours["mme_perception_score"] + ours["mme_cognition_score"])
    assert 0 < ours["mme_perception_score"] < 600 and 0 < ours["mme_cognition_score"] < 200


def test_mme_without_cognition_documents_reports_no_cognition_score(mme_docs, tmp_path):
    docs = [d for d in mme_docs if d["category"] in ("existence", "count")]
    preds = _answers(docs)
    theirs = _theirs(_lmms_task("mme"), docs, preds)
    ours = _ours("digits_mme", docs, preds, tmp_path)
    assert set(theirs) == {"mme_perception_score"} and "mme_cognition_score" not in ours  # left out, as lmms-eval
    assert ours["mme_perception_score"] == theirs["mme_perception_score"]


def test_our_perception_list_is_lmms_evals():
    from lmms_eval.tasks.mme.utils import eval_type_dict

    from mm.eval.scoring import MME_PERCEPTION_CATEGORIES

    assert list(MME_PERCEPTION_CATEGORIES) == eval_type_dict["Perception"]
