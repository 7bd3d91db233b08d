"""Students initialised from teacher layers, for BERT, RoBERTa, DistilBERT and GPT-2."""

from __future__ import annotations

import pytest
import torch
import transformers

from fastdistill.train.demo import tiny_config
from fastdistill.train.student import copy_check, default_student_layers, init_student_from_teacher

HEADS = {
    "bert": [transformers.BertForMaskedLM, transformers.BertModel],
    "roberta": [transformers.RobertaForMaskedLM, transformers.RobertaModel],
    "distilbert": [transformers.DistilBertForMaskedLM, transformers.DistilBertModel],
    "gpt2": [transformers.GPT2LMHeadModel, transformers.GPT2Model],
}


@pytest.mark.parametrize("arch", sorted(HEADS))
@pytest.mark.parametrize("head", [0, 1])
def test_init_from_teacher(arch, head):
    torch.manual_seed(0)
    cls = HEADS[arch][head]
    teacher = cls(tiny_config(arch, 97, hidden=32, layers=4)).eval()
    student = init_student_from_teacher(teacher, [0, 3])
    assert type(student) is cls and student.config.num_hidden_layers == 2
    assert teacher.config.num_hidden_layers == 4  # the teacher's config is not touched
    assert copy_check(student, teacher, [0, 3])
    # Same embeddings and head; a forward pass works and matches when every layer is copied.
    full = init_student_from_teacher(teacher, [0, 1, 2, 3]).eval()
    x = torch.randint(5, 97, (2, 9))
    out_t, out_s = teacher(input_ids=x), full(input_ids=x)
    key = "logits" if hasattr(out_t, "logits") else "last_hidden_state"
    torch.testing.assert_close(out_s[key], out_t[key])
    student(input_ids=x)
    if hasattr(student, "get_output_embeddings") and student.get_output_embeddings() is not None:
        # tied LM head still tied after the copy
        assert (
            student.get_output_embeddings().weight.data_ptr()
            == student.get_input_embeddings().weight.data_ptr()
        )


def test_default_layers_every_other():
    assert default_student_layers(12) == [0, 2, 4, 6, 8, 10]
    assert default_student_layers(6) == [0, 2, 4]
    teacher = transformers.BertForMaskedLM(tiny_config("bert", 50, layers=6))
    student = init_student_from_teacher(teacher)
    assert student.config.num_hidden_layers == 3 and copy_check(student, teacher, [0, 2, 4])


def test_bad_layers_and_unknown_arch():
    teacher = transformers.BertForMaskedLM(tiny_config("bert", 50, layers=4))
    with pytest.raises(ValueError, match=r"out of range.*4 layers"):
        init_student_from_teacher(teacher, [0, 4])
    with pytest.raises(ValueError, match="at least one"):
        init_student_from_teacher(teacher, [])
    electra = transformers.ElectraForMaskedLM(
        transformers.ElectraConfig(
            vocab_size=50,
            embedding_size=16,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    with pytest.raises(
        ValueError, match="cannot initialise a student from a 'electra' teacher.*bert"
    ):
        init_student_from_teacher(electra)
