"""The recipe's quantize: section."""
import pytest

from birdbone_core.errors import BirdboneError
from birdbone_core.recipe import parse_recipe


def test_defaults_and_normalisation():
    r = parse_recipe({"quantize": {"target_bpw": 4.5, "types": ["q4_k", "Q8_0", "q4_k"],
                                   "overrides": {"token_embd": "q4_0", r"blk\.0\.": "f16"},
                                   "stress": {"ffn_down": 2.0, "blk": 1.5}}})
    q = r.quantize
    assert q.types == ["Q8_0", "Q4_K"]
    assert q.override_for("token_embd.weight") == "Q4_0"
    assert q.override_for("blk.0.attn_q.weight") == "F16"
    assert q.override_for("blk.1.attn_q.weight") is None
    assert q.stress_for("blk.3.ffn_down.weight") == 3.0
    assert q.gptq.enabled and q.gptq.act_order
    assert parse_recipe({}).quantize is None


@pytest.mark.parametrize("section, msg", [
    ({"target_bpw": 4, "bogus": 1}, "quantize.bogus: unknown field"),
    ({"target_bpw": 4, "types": ["Q7_K"]}, "unknown tensor type 'Q7_K'"),
    ({"target_bpw": 4, "types": []}, "at least one candidate type"),
    ({"target_bpw": 4, "overrides": {"(": "Q4_0"}}, "invalid regex"),
    ({"target_bpw": 4, "stress": {"x": 0}}, "must be > 0"),
    ({"target_bpw": 4, "target_bytes": 10}, "give one of target_bpw, target_bytes, target_size, not target_bpw and target_bytes"),
    ({"target_size": "12 parsecs"}, "quantize.target_size: .*give bytes with a unit"),
    ({"target_size": "120%"}, "between 0 and 100%"),
    ({"target_bpw": 4, "gptq": {"act_order": True, "x": 1}}, "quantize.gptq.x: unknown field"),
    ({"target_bpw": 0.5}, "target_bpw"),
])
def test_errors_name_the_field(section, msg):
    with pytest.raises(BirdboneError, match=msg.replace("(", r"\(")):
        parse_recipe({"quantize": section}, "r.yaml")
