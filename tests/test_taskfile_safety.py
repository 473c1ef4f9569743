"""Task files: templates render in a sandbox, !function stays in its folder, names are safe file names, include
loops are one-line errors. (A task folder's Python still runs: it is code, and the docs say so.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from mm.eval.taskfile import TaskFileError, call_doc_fn, discover, load_tasks, load_yaml

ROOT = Path(__file__).resolve().parent.parent
BASE = "dataset_path: json\noutput_type: generate_until\nmetric_list:\n  - metric: acc\n"


def _payloads(sentinel: Path) -> list[str]:
    """Template texts that, rendered by a plain jinja2, run a shell command that creates ``sentinel``."""
    payloads = [
        "{{ cycler.__init__.__globals__.os.popen('CMD').read() }}",
        "{{ joiner.__init__.__globals__['os'].system('CMD') }}",
        "{{ lipsum.__globals__['os'].popen('CMD').read() }}",
        "{{ namespace.__init__.__globals__.os.popen('CMD').read() }}",
        "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'catch_warnings' %}"
        "{{ c()._module.__builtins__['__import__']('os').system('CMD') }}{% endif %}{% endfor %}",
    ]
    return [t.replace("CMD", f"touch {sentinel}") for t in payloads]


def test_template_payloads_fail_in_the_sandbox_and_run_nothing(tmp_path):
    sentinel = tmp_path / "pwned"
    for payload in _payloads(sentinel):
        with pytest.raises(TaskFileError, match="refused by the sandbox|template"):
            call_doc_fn(payload, {"question": "2+2"})
        assert not sentinel.exists(), payload
    # through a task file too: the payload needs no !function and no Python file at all
    (tmp_path / "evil.yaml").write_text(f"task: evil\n{BASE}doc_to_text: {_payloads(sentinel)[0]!r}\n")
    (task,) = load_tasks(["evil"], [tmp_path])
    with pytest.raises(TaskFileError, match="refused by the sandbox"):
        call_doc_fn(task.doc_to_text, {"question": "2+2"})
    assert not sentinel.exists()
    # ordinary templates still render
    assert call_doc_fn("Q: {{ question }} {{ options | join(',') }}", {"question": "2+2", "options": ["a", "b"]}) == (
        "Q: 2+2 a,b"
    )


@pytest.mark.parametrize(
    "spec", [".a.b.f", "..utils.f", "../outside.f", "/etc/passwd.f", "a/../../b.f", "utils.", "a b.f", "f"]
)
def test_function_refs_that_are_not_module_names_are_refused(tmp_path, spec):
    (tmp_path / "t.yaml").write_text(f"task: t\n{BASE}doc_to_text: !function {spec}\n")
    (task,) = load_tasks(["t"], [tmp_path])
    with pytest.raises(TaskFileError, match=r"not module\.name") as e:
        call_doc_fn(task.doc_to_text, {"q": "x"})
    assert "\n" not in str(e.value)


def test_function_refs_stay_inside_their_task_folder(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "evil.py").write_text("def f(doc):\n    return 'ran outside'\n")
    tasks = tmp_path / "tasks"
    (tasks / "sub").mkdir(parents=True)
    (tasks / "sub" / "helpers.py").write_text("def f(doc):\n    return 'sub:' + doc['q']\n")
    (tasks / "linked.py").symlink_to(outside / "evil.py")
    (tasks / "ok.yaml").write_text(f"task: ok\n{BASE}doc_to_text: !function sub.helpers.f\n")
    (tasks / "link.yaml").write_text(f"task: link\n{BASE}doc_to_text: !function linked.f\n")
    ok, link = load_tasks(["ok", "link"], [tasks])
    assert call_doc_fn(ok.doc_to_text, {"q": "x"}) == "sub:x"  # a subfolder of the task folder is inside it
    with pytest.raises(TaskFileError, match="outside the task folder"):
        call_doc_fn(link.doc_to_text, {"q": "x"})
    # an importable module name still resolves (lmms-eval's rule), e.g. the bundled TSV converters
    (tasks / "mod.yaml").write_text(f"task: mod\n{BASE}doc_to_text: !function mm.eval.sources.is_missing\n")
    (mod,) = load_tasks(["mod"], [tasks])
    assert call_doc_fn(mod.doc_to_text, "") is True


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden", "x y", "", "a\\b", "x" * 200, 7])
def test_task_and_group_names_must_be_safe_file_names(tmp_path, name):
    (tmp_path / "bad.yaml").write_text(f"task: {name!r}\n{BASE}" if isinstance(name, str) else f"task: {name}\n")
    with pytest.raises(TaskFileError, match=r"bad\.yaml: task name .* is not allowed"):
        discover([tmp_path])
    (tmp_path / "bad.yaml").write_text(f"group: {name!r}\ntask: [a]\n")
    with pytest.raises(TaskFileError, match=r"group name .* is not allowed"):
        discover([tmp_path])


def test_an_include_loop_is_a_one_line_error_naming_the_chain(tmp_path):
    (tmp_path / "a.yaml").write_text(f"include: b.yaml\ntask: a\n{BASE}")
    (tmp_path / "b.yaml").write_text("include: c_yaml\n")
    (tmp_path / "c_yaml").write_text("include: a.yaml\n")
    with pytest.raises(TaskFileError) as e:
        load_yaml(tmp_path / "a.yaml")
    message = str(e.value)
    assert "\n" not in message and message.startswith("include loop: ")
    assert [Path(p).name for p in message.removeprefix("include loop: ").split(" -> ")] == [
        "a.yaml", "b.yaml", "c_yaml", "a.yaml"
    ]  # fmt: skip
    (tmp_path / "self.yaml").write_text("include: self.yaml\ntask: s\n")
    with pytest.raises(TaskFileError, match=r"include loop: .*self\.yaml -> .*self\.yaml$"):
        load_yaml(tmp_path / "self.yaml")


def test_bundled_tasks_still_load_and_render():
    names = discover()
    tasks = load_tasks(sorted(n for n in names if not n.startswith("digits_longctx")))
    assert tasks and all(t.task for t in tasks)
    geneval = next(t for t in tasks if t.task == "digits_geneval")
    assert call_doc_fn(geneval.doc_to_text, {"prompt": "a photo of one 7"}) == "a photo of one 7"
