"""The served model's chat template: the checkpoint's own when it ships one, else the documented default."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from recurrent_depth.serving.model import DEFAULT_TEMPLATE_STOPS, find_chat_template, load_served_model

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
MESSAGES = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]


def test_default_template(served) -> None:
    assert served.render(MESSAGES) == "system: s\nuser: u\nassistant:"
    assert served.template_stop == DEFAULT_TEMPLATE_STOPS


@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja"])
def test_checkpoint_template_is_used(ckpt: Path, tmp_path: Path, where: str) -> None:
    folder = tmp_path / "with-template"
    shutil.copytree(ckpt, folder)
    if where == "chat_template.jinja":
        (folder / where).write_text(TEMPLATE)
    else:
        config = json.loads((folder / where).read_text())
        config["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": TEMPLATE}]
        (folder / where).write_text(json.dumps(config))
    assert find_chat_template(folder) == TEMPLATE
    served = load_served_model(folder)
    assert served.render(MESSAGES) == "<system>s<user>u<assistant>"
    assert served.template_stop == () and served.model_id == "with-template"


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_served_model(tmp_path / "nowhere")


def test_generation_config_eos_ids_also_stop(ckpt: Path, tmp_path: Path, served) -> None:
    folder = tmp_path / "eos"
    shutil.copytree(ckpt, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2, "x"]}))
    assert load_served_model(folder).stop_token_ids == (served.tokenizer.eos_token_id, 7)
