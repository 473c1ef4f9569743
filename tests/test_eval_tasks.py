"""Task files, local dataset loaders (VLMEvalKit TSV), GenEval rules and generation metrics."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mm.eval.taskfile import TaskFileError, call_doc_fn, discover, load_tasks

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "mm" / "eval" / "tasks"


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory) -> Path:
    """The bundled benchmark datasets, built from scratch into a temp folder."""
    from data.bundled.benchmark import build_bench

    out = tmp_path_factory.mktemp("bench")
    build_bench(out, ["digits_mcq", "digits_pope", "digits_mme", "digits_geneval"])
    return out


def test_include_and_function_resolve_relative_to_their_own_file(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "helpers.py").write_text("def prompt(doc):\n    return 'shared:' + doc['q']\n")
    (shared / "_base_yaml").write_text(
        "dataset_path: json\noutput_type: generate_until\ndoc_to_text: !function helpers.prompt\n"
        "generation_kwargs: {max_new_tokens: 3}\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
    )
    (tmp_path / "helpers.py").write_text("def prompt(doc):\n    return 'local:' + doc['q']\n")
    (tmp_path / "mytask.yaml").write_text(
        "include: shared/_base_yaml\ntask: my_task\ntest_split: validation\ngeneration_kwargs: {max_new_tokens: 7}\n"
    )
    (tmp_path / "other.yaml").write_text(
        "include: shared/_base_yaml\ntask: my_other\ndoc_to_text: !function helpers.prompt\n"
    )
    assert set(discover([tmp_path])) == {"my_task", "my_other"}  # the template is not a task
    mine, other = load_tasks(["my_task", "my_other"], [tmp_path])
    assert mine.test_split == "validation" and mine.generation_kwargs == {"max_new_tokens": 7}  # override wins
    assert mine.metric_list == [{"metric": "acc", "aggregation": "mean"}]  # inherited
    # !function resolves next to the file that holds the tag: the template's helpers vs this file's
    assert call_doc_fn(mine.doc_to_text, {"q": "x"}) == "shared:x"
    assert call_doc_fn(other.doc_to_text, {"q": "x"}) == "local:x"
    (tmp_path / "bad.yaml").write_text("task: bad\ndoc_to_txt: question\n")
    with pytest.raises(TaskFileError, match=r"bad.yaml.*doc_to_txt"):
        load_tasks(["bad"], [tmp_path])
    with pytest.raises(KeyError, match="my_task"):
        load_tasks(["nope"], [tmp_path])


def test_bundled_tasks_are_discovered_and_groups_expand():
    names = discover()
    assert {"digits_vqa", "digits_t2i", "digits_mcq", "digits_mme", "digits_geneval", "digits_pope"} <= set(names)
    pope = [t.task for t in load_tasks(["digits_pope"])]
    assert pope == ["digits_pope_random", "digits_pope_popular", "digits_pope_adversarial"]
    assert {t.test_split for t in load_tasks(["digits_pope"])} == {"random", "popular", "adversarial"}


def _tsv_task(tmp_path: Path, tsv: Path) -> Path:
    d = tmp_path / "tsv_tasks"
    d.mkdir()
    (d / "tsv_utils.py").write_text("from mm.eval.sources import resolve_tsv_image_refs as process_docs\n")
    (d / "mcq_tsv.yaml").write_text(
        f"include: {TASKS / 'digits_mcq' / 'digits_mcq.yaml'}\ntask: digits_mcq_tsv\ndataset_path: csv\n"
        f'dataset_kwargs:\n  data_files: {{test: {tsv}}}\n  sep: "\\t"\n'
        "  converters: !function mm.eval.sources.VLMEVALKIT_TEXT\nprocess_docs: !function tsv_utils.process_docs\n"
    )
    return d


def test_vlmevalkit_tsv_round_trip(bench_dir, tmp_path):
    """Bundled MCQ rows -> VLMEvalKit TSV (base64 images, A-D, an empty option, an image by reference) -> same docs."""
    import datasets

    from mm.eval.sources import load_task_docs, write_vlmevalkit_tsv

    ds = datasets.load_from_disk(str(bench_dir / "digits_mcq"))["test"].select(range(8))
    rows = [dict(r) for r in ds]
    rows[5]["D"] = None  # a 3-option question: VLMEvalKit leaves the cell empty
    write_vlmevalkit_tsv(rows, tmp_path / "mcq.tsv")
    # VLMEvalKit stores a repeated image once; later rows name the row that holds it
    lines = (tmp_path / "mcq.tsv").read_text().splitlines()
    cols = lines[0].split("\t")
    cells = lines[2].split("\t")
    cells[cols.index("image")] = "0"
    lines[2] = "\t".join(cells)
    (tmp_path / "mcq.tsv").write_text("\n".join(lines) + "\n")

    task = load_tasks(["digits_mcq_tsv"], [_tsv_task(tmp_path, tmp_path / "mcq.tsv")])[0]
    docs = load_task_docs(task)
    ref = load_tasks(["digits_mcq"])[0]
    kw = task.prompt_kwargs()
    assert len(docs) == 8
    for i, (a, b) in enumerate(zip(docs, rows)):
        b = {**b, "image": rows[0]["image"]} if i == 1 else b  # row 1 now points at row 0's image
        assert call_doc_fn(task.doc_to_text, a, kw) == call_doc_fn(ref.doc_to_text, b, kw)
        img_a = np.asarray(call_doc_fn(task.doc_to_visual, a)[0])
        assert np.array_equal(img_a, np.asarray(b["image"]))
        assert a["answer"] == b["answer"]
    assert "\nD." not in call_doc_fn(task.doc_to_text, docs[5], kw)  # the empty option is left out
    # scoring sees the same documents: the same responses give the same metrics
    answers = [r["answer"] for r in rows]
    res_tsv = [task.process_results(d, [a]) for d, a in zip(docs, answers)]
    res_ref = [ref.process_results(r, [a]) for r, a in zip(rows, answers)]
    assert res_tsv == res_ref


def test_geneval_rules_by_hand():
    from data.bundled.judge import Detection
    from mm.eval.generation import geneval_judge, geneval_summary, relative_position

    assert relative_position((0, 0, 8, 8), (20, 0, 28, 8)) == {"left of"}
    assert relative_position((0, 20, 8, 28), (0, 0, 8, 8)) == {"below"}
    assert relative_position((0, 0, 8, 8), (1, 1, 9, 9)) == set()  # overlapping boxes: no relation

    def det(label, x, y, score=0.99):
        return Detection(label, score, (x, y, x + 8, y + 8))

    two = {"tag": "two_object", "include": [{"class": "3", "count": 1}, {"class": "5", "count": 1}]}
    assert geneval_judge(two, [det(3, 0, 0), det(5, 12, 0)])[0]
    assert not geneval_judge(two, [det(3, 0, 0), det(3, 12, 0)])[0]
    assert not geneval_judge(two, [det(3, 0, 0), det(5, 12, 0, score=0.2)])[0]  # below the 0.3 threshold
    count = {"tag": "counting", "include": [{"class": "4", "count": 2}], "exclude": [{"class": "4", "count": 3}]}
    assert geneval_judge(count, [det(4, 0, 0), det(4, 12, 0)])[0]
    assert not geneval_judge(count, [det(4, 0, 0), det(4, 12, 0), det(4, 23, 0)])[0]  # too many
    assert not geneval_judge(count, [det(4, 0, 0), det(4, 12, 0, score=0.8)])[0]  # counting needs 0.9
    pos = {
        "tag": "position",
        "include": [{"class": "5", "count": 1}, {"class": "3", "count": 1, "position": ["left of", 0]}],
    }
    assert geneval_judge(pos, [det(3, 0, 0), det(5, 12, 0)])[0]  # "3 left of 5"
    ok, reason = geneval_judge(pos, [det(3, 12, 0), det(5, 0, 0)])
    assert not ok and "left of" in reason
    s = geneval_summary([{"tag": "a", "correct": 1}, {"tag": "a", "correct": 0}, {"tag": "b", "correct": 1}])
    assert s["per_tag"] == {"a": 0.5, "b": 1.0} and s["overall"] == 0.75  # mean over tags, not images


def test_detector_finds_real_digits_on_a_canvas_and_layout_round_trips(tmp_path):
    from data.bundled.benchmark import Sampler, geneval_metadata, render_geneval
    from data.bundled.judge import detect_digits, get_judge
    from mm.eval.generation import geneval_judge, read_geneval_layout, write_geneval_layout

    judge = get_judge(crops=True)
    assert judge.heldout_accuracy > 0.95
    sampler = Sampler("heldout", "test_detector")
    canvas = sampler.canvas([1, 7, 0], [(0, 0), (1, 2), (2, 1)]).astype(np.float32) / 255
    found = sorted((d.label, d.box[:2]) for d in detect_digits(canvas, judge))
    assert [f[0] for f in found] == [0, 1, 7] and found[1][1] == (1.0, 1.0) or len(found) == 3
    meta = geneval_metadata(per_tag=5)
    images = [[render_geneval(m, sampler)[None].astype(np.float32) / 255] for m in meta]
    correct = [geneval_judge(m, detect_digits(im[0][0], judge))[0] for m, im in zip(meta, images)]
    assert np.mean(correct) >= 0.7  # real canvases mostly pass: the judge's ceiling is well above chance
    write_geneval_layout(tmp_path / "gen", meta, images)
    assert (tmp_path / "gen" / "00003" / "metadata.jsonl").is_file()
    assert (tmp_path / "gen" / "00003" / "samples" / "0000.png").is_file()
    back = read_geneval_layout(tmp_path / "gen")
    assert [m for m, _ in back] == meta
    assert np.allclose(back[3][1][0], images[3][0][0], atol=1 / 255)


def test_kernel_and_frechet_distances_by_hand():
    from data.bundled.judge import frechet_distance
    from mm.eval.generation import kernel_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 3)), rng.normal(1.0, 1.0, size=(6, 3))

    def k(x, y):
        return (x @ y / 3 + 1) ** 3

    m = 6
    kxx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / (m * m)
    assert kernel_distance(a, b, subsets=1, subset_size=6) == pytest.approx(kxx + kyy - 2 * kxy)
    x = rng.normal(size=(500, 4))
    assert abs(frechet_distance(x, x)) < 1e-6
    # two Gaussians with identity covariance: FD = ||mu_a - mu_b||^2 (+ sampling noise)
    y = rng.normal(size=(20000, 4)) + 2.0
    z = rng.normal(size=(20000, 4))
    assert frechet_distance(y, z) == pytest.approx(16.0, rel=0.02)


def test_missing_weights_are_reported_as_skipped(tmp_path):
    from mm.eval.generation import clip_score, inception_metrics

    imgs = np.zeros((2, 1, 8, 8), dtype=np.float32)
    missing = tmp_path / "nope.pth"
    assert inception_metrics(imgs, imgs, str(missing)) == {
        "fid": f"skipped: weights not found at {missing}",
        "kid": f"skipped: weights not found at {missing}",
    }
    assert clip_score(imgs, ["a", "b"], "ViT-B-32", str(missing)) == f"skipped: weights not found at {missing}"
    assert inception_metrics(imgs, imgs, "")["fid"].startswith("skipped: weights not found at <unset")


def test_clip_score_with_a_local_open_clip_checkpoint(tmp_path):
    import open_clip

    from mm.eval.generation import clip_score

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
           "patch_size": 8}, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
           "layers": 1}}  # fmt: skip
    (tmp_path / "tiny-clip-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "tiny-clip-test.json")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip-test")
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(3, 1, 8, 8)).astype(np.float32)
    texts = ["draw the digit 1", "draw the digit 2", "a cat"]
    got = clip_score(images, texts, "tiny-clip-test", tmp_path / "clip.pt")
    # by hand: 100 * max(cos, 0) of the same model's embeddings, averaged
    m2, _, pre = open_clip.create_model_and_transforms("tiny-clip-test", pretrained=str(tmp_path / "clip.pt"))
    from PIL import Image

    with torch.no_grad():
        pil = [Image.fromarray((im[0] * 255).round().astype(np.uint8)).convert("RGB") for im in images]
        e_i = m2.eval().encode_image(torch.stack([pre(p) for p in pil]))
        e_t = m2.encode_text(open_clip.get_tokenizer("tiny-clip-test")(texts))
    want = float((100 * torch.nn.functional.cosine_similarity(e_i, e_t).clamp(min=0)).mean())
    assert got == pytest.approx(want, rel=1e-5)


def test_bench_datasets_are_deterministic_and_shaped_like_their_benchmarks():
    from data.bundled.benchmark import BENCH_DATASETS, class_similarity_order

    pope = BENCH_DATASETS["digits_pope"](0)
    assert pope == BENCH_DATASETS["digits_pope"](0)  # seeded: the same bytes every build
    similar = class_similarity_order()
    rank = {}  # split -> mean similarity rank of each absent digit to its closest present digit
    for split, rows in pope.items():
        assert sum(r["answer"] == "yes" for r in rows) * 2 == len(rows) == 360  # POPE: balanced yes/no
        ranks = []
        for canvas in {r["image_id"] for r in rows}:
            qs = [r for r in rows if r["image_id"] == canvas]
            present = {r["digit"] for r in qs if r["answer"] == "yes"}
            assert not present & {r["digit"] for r in qs if r["answer"] == "no"}
            ranks += [min(similar[p].index(r["digit"]) for p in present) for r in qs if r["answer"] == "no"]
        rank[split] = np.mean(ranks)
    assert rank["adversarial"] < 0.5 * rank["random"]  # adversarial negatives look like what is there
    mme = BENCH_DATASETS["digits_mme"](0)["test"]
    pairs = {}
    for r in mme:
        pairs.setdefault(r["question_id"], []).append(r["answer"])
    assert all(sorted(v) == ["no", "yes"] for v in pairs.values()) and len(pairs) == 160
    mcq = BENCH_DATASETS["digits_mcq"](0)["test"]
    for g in range(0, len(mcq), 4):
        rot = mcq[g : g + 4]
        correct = {r[r["answer"]] for r in rot}
        assert len(correct) == 1 and {r["answer"] for r in rot} == set("ABCD")  # the answer visits every letter


def test_training_records_are_llava_conversations_with_images(tmp_path):
    from PIL import Image

    from data.bundled.benchmark import bench_texts, write_training_data

    counts = write_training_data(tmp_path, per_kind=3)
    conv = [json.loads(ln) for ln in (tmp_path / "conversations.jsonl").read_text().splitlines()]
    assert len(conv) == counts["conversations"] == 3 * 2 + 3 * 2 + 3 * 4
    for r in conv:
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n") and gpt["from"] == "gpt"
        assert Image.open(tmp_path / r["image"]).size in ((8, 8), (32, 32))
    assert {c["conversations"][1]["value"] for c in conv} >= {"yes", "no"}
    assert any(c["conversations"][1]["value"] in "ABCD" for c in conv)
    gen = [json.loads(ln) for ln in (tmp_path / "generation.jsonl").read_text().splitlines()]
    assert len(gen) == counts["generation"] == 12 and all((tmp_path / g["image"]).is_file() for g in gen)
    words = {w for t in bench_texts() for w in t.lower().replace("?", " ").split()}
    assert {"yes", "no", "left", "copies"} <= words  # what a tokenizer for these formats must know


def test_a_broken_image_fails_naming_the_task_and_document(bench_dir, tmp_path):
    import datasets

    from mm.eval.harness import _visuals
    from mm.eval.sources import load_task_docs, write_vlmevalkit_tsv

    rows = [dict(r) for r in datasets.load_from_disk(str(bench_dir / "digits_mcq"))["test"].select(range(2))]
    write_vlmevalkit_tsv(rows, tmp_path / "bad.tsv")
    text = (tmp_path / "bad.tsv").read_text().replace("iVBOR", "AAAA", 1)
    (tmp_path / "bad.tsv").write_text(text)  # the first image's PNG header is corrupted
    task = load_tasks(["digits_mcq_tsv"], [_tsv_task(tmp_path, tmp_path / "bad.tsv")])[0]
    docs = load_task_docs(task)
    with pytest.raises(ValueError, match=r"task digits_mcq_tsv: document 0: doc_to_visual failed"):
        _visuals(task, docs[0], 0)
    assert len(_visuals(task, docs[1], 1)) == 1


def test_jsonl_and_parquet_datasets_load_through_the_packaged_builders(bench_dir, tmp_path):
    import datasets

    from mm.eval.sources import load_task_docs

    ds = datasets.load_from_disk(str(bench_dir / "digits_mcq"))["test"].select(range(6))
    ds.to_parquet(str(tmp_path / "mcq.parquet"))  # keeps the Image feature in the schema
    ds.remove_columns("image").to_json(str(tmp_path / "mcq.jsonl"))
    (tmp_path / "pq.yaml").write_text(
        f"include: {TASKS / 'digits_mcq' / 'digits_mcq.yaml'}\ntask: mcq_parquet\ndataset_path: parquet\n"
        "dataset_kwargs:\n  data_files: {test: mcq.parquet}\n"  # relative to this YAML's folder
    )
    (tmp_path / "js.yaml").write_text(
        f"include: {TASKS / 'digits_mcq' / 'digits_mcq.yaml'}\ntask: mcq_jsonl\ndataset_path: json\n"
        "dataset_kwargs:\n  data_files: {test: mcq.jsonl}\n"
    )
    pq, js = load_tasks(["mcq_parquet", "mcq_jsonl"], [tmp_path])
    got_pq, got_js = load_task_docs(pq), load_task_docs(js)
    assert got_js.to_list() == ds.remove_columns("image").to_list()
    assert [np.asarray(r["image"]).tolist() for r in got_pq] == [np.asarray(r["image"]).tolist() for r in ds]
