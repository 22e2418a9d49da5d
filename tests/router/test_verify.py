"""The answer verifier: what it keeps, what it drops and why."""

from router.evidence import Sentence, Span
from router.verify import Verifier, VerifierConfig, declines, split_sentences, strip_markers

SHRED = "-n, --iterations=N overwrite N times instead of the default (3)"
REMOVE = "-u deallocate and remove file after overwriting"
EVIDENCE = [Sentence(1, Span(0, len(SHRED), 0.8), SHRED), Sentence(2, Span(0, len(REMOVE), 0.5), REMOVE)]
QUESTION = "How many times does shred overwrite a file unless told otherwise?"


def check(sentence, similarity=None):
    return Verifier(QUESTION, EVIDENCE).check(sentence, similarity)


def test_a_sentence_whose_number_is_not_in_the_evidence_is_dropped():
    verdict = check("Shred overwrites the file 25 times by default [1].")
    assert not verdict.supported and "number 25" in verdict.reason
    assert check("Shred uses a SHA-1 hash 203856749 to overwrite the file.").reason.startswith("number")


def test_the_same_sentence_with_the_evidence_number_is_kept_and_cited_to_its_source():
    verdict = check("By default shred overwrites the file 3 times [2].")
    assert verdict.supported and verdict.source == 1  # the router's citation, not the model's [2]
    assert verdict.sentence == "By default shred overwrites the file 3 times."
    assert verdict.support.text == SHRED


def test_an_option_name_not_in_the_evidence_is_dropped():
    verdict = check("Use the --passes option to overwrite the file 3 times.")
    assert not verdict.supported and "option --passes" in verdict.reason
    assert check("Use -n to choose how many times to overwrite; the default is 3.").supported


def test_a_sentence_that_only_restates_the_question_is_dropped():
    assert not check("The answer to the question is:").supported
    assert not check("Shred overwrites a file unless told otherwise.").supported


def test_words_not_in_the_evidence_are_dropped_unless_a_close_paraphrase():
    invented = "Shred encrypts the disk with a random key before formatting it."
    assert not check(invented).supported
    paraphrase = "The data gets overwritten repeatedly, 3 times by default."
    weak = check(paraphrase, similarity=[0.3, 0.1])
    strong = check(paraphrase, similarity=[0.8, 0.1])
    assert not weak.supported and strong.supported and strong.source == 1


def test_declining_is_never_an_answer():
    assert declines("I don't know.") and declines("The evidence does not mention it.")
    assert not check("I don't know how many times shred overwrites [1].").supported
    assert not declines("shred overwrites 3 times")


def test_sentences_are_split_as_they_stream_without_cutting_numbers_or_options():
    done, rest = split_sentences("It overwrites 3.5 times. Use -n. Then it")
    assert done == ["It overwrites 3.5 times.", "Use -n."] and rest == "Then it"
    assert split_sentences("First line\nsecond")[0] == ["First line"]
    assert strip_markers("Yes [1, 2] it does [3].") == "Yes it does."
    # the preamble a small model puts before its answer is not part of it
    assert strip_markers("The answer is: the lighthouse was painted in 1931. [1]") == "The lighthouse was painted in 1931."
    assert strip_markers("Based on the evidence, drones are males.") == "Drones are males."
    assert strip_markers("Answer: 3") == "3"
    assert strip_markers("The answer is the default.") == "The answer is the default."  # no colon or comma: a claim


def test_an_option_or_number_of_a_lesser_evidence_sentence_is_not_enough():
    # -u is in the evidence, but not in the best sentence, which is what the question is about.
    verdict = check("Use -u to choose how many times shred overwrites.")
    assert not verdict.supported and "option -u" in verdict.reason


def test_code_and_filler_are_not_answers():
    assert check("def overwrite_file(times=3):").reason == "code, not an answer"
    assert not check("You can use the following option to overwrite the file:").supported
    assert not check("The number of times is not specified.").supported


def test_a_claim_stitched_from_several_evidence_sentences_is_not_supported():
    dance = "For sources close to the nest a bee performs a simple round dance."
    colony = "The hive holds one colony of bees."
    evidence = [Sentence(1, Span(0, len(dance), 0.9), dance), Sentence(1, Span(0, len(colony), 0.6), colony)]
    verifier = Verifier("How do honeybees tell each other where the flowers are?", evidence)
    invented = "The bees use a simple round dance, also known as a bee-hive or colony, to communicate."
    # Each word is somewhere in the evidence, but no one sentence says it; its cosine (0.75) is no paraphrase.
    assert not verifier.check(invented, similarity=[0.75, 0.4]).supported
    assert verifier.check("A bee performs a simple round dance for sources close to the nest.").supported


def test_evidence_words_in_a_claim_the_evidence_does_not_make_are_dropped():
    sentence = "By default shred overwrites the file 3 times."
    assert check(sentence).supported  # words alone (no embedder at hand) accept it
    assert check(sentence, similarity=[0.85, 0.2]).supported
    assert not check(sentence, similarity=[0.4, 0.2]).supported  # the same words, meaning something else


def test_a_paraphrase_that_adds_its_own_claim_to_the_evidence_is_dropped():
    evidence = [Sentence(1, Span(0, 10, 0.9), "Sourdough is bread leavened by a naturally occurring community of "
                                                 "microorganisms rather than by commercial baker's yeast.")]
    verifier = Verifier("How is sourdough bread leavened?", evidence)
    wrong = "Sourdough bread is leavened using a combination of natural and artificial methods, including yeast."
    verdict = verifier.check(wrong, [0.85])  # close in meaning: the embedding alone would let it through
    assert not verdict.supported and "artificial" in verdict.reason
    right = "Sourdough bread is leavened by naturally occurring microorganisms, not commercial yeast."
    assert verifier.check(right, [0.9]).supported
    loose = Verifier("How is sourdough bread leavened?", evidence, VerifierConfig(max_paraphrase_new_words=-1))
    assert loose.check(wrong, [0.85]).supported  # the check is what drops it


def test_a_sentence_of_the_evidences_words_may_not_bring_a_claim_of_its_own():
    """Most of its words are the evidence's, but "local artist" is a painter the evidence never named."""
    evidence = [Sentence(1, Span(0, 10, 0.9), "The lighthouse at Quendra Bay was painted teal in 1931.")]
    verifier = Verifier("Who painted the Quendra Bay lighthouse teal?", evidence)
    invented = verifier.check("The answer is: The Quendra Bay lighthouse was painted in 1931 by the local artist. [1]")
    assert not invented.supported and "local" in invented.reason and "artist" in invented.reason
    assert verifier.check("The Quendra Bay lighthouse was painted teal in 1931 [1]").supported
    # one word of its own is wording, not a claim
    assert Verifier("When was the lighthouse painted?", evidence).check(
        "The lighthouse at Quendra Bay was freshly painted teal in 1931.").supported
