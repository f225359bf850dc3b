"""The data config's own values: `data.fields` and `data.template_format` refused with a
message naming the key."""

import pytest

from sft_jax.data.spec import Fields, FormatTemplate


@pytest.mark.parametrize(
    "text,match",
    [
        ("instruction", "is not <our name>=<your name>"),
        ("question=instruction", "unknown field 'question'"),
        ("role.bot=assistant", "role.system, role.user, role.assistant"),
    ],
)
def test_bad_fields_setting(text, match):
    with pytest.raises(ValueError, match=r"data\.fields.*" + match):
        Fields.parse(text)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"assistant": "{content} and {content}"}, r"assistant.*exactly once"),
        ({"assistant": "no content"}, r"assistant.*exactly once"),
        ({"user": "{question}"}, r"data\.template_format\.user.*unknown field.*question"),
        ({"system": "{content"}, r"data\.template_format\.system"),
    ],
)
def test_bad_user_template_names_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        FormatTemplate(**change).check()
