from fabric.text import content_words, numbers, options, sentence_spans, stem


def test_stems_match_the_forms_of_a_word():
    assert stem("overwrites") == stem("overwrite") == stem("overwriting")
    assert stem("files") == stem("file") and stem("copies") == stem("copied") == "copy"
    assert stem("process") == "process" and stem("status") == "status"


def test_content_words_numbers_and_options():
    assert content_words("How do I list the newest files first?") == ["list", "newest", stem("files"), "first"]
    assert numbers("3 passes, 1,024 bytes, 0.5 s, v2 and -n5") == {"3", "1024", "0.5"}
    assert options("use -n 5 or --iterations=N; a well-known -- x") == {"-n", "--iterations"}


def test_sentence_spans_split_at_paragraphs_and_sentence_ends_only():
    text = "NAME\n\nshred - overwrite a file. Use e.g. -n to set 3.5 passes. Next!\n\n-u remove the file"
    pieces = [text[a:b] for a, b in sentence_spans(text)]
    assert pieces == ["NAME", "shred - overwrite a file.", "Use e.g. -n to set 3.5 passes.", "Next!", "-u remove the file"]
    long = "word " * 200
    assert all(b - a <= 400 for a, b in sentence_spans(long)) and len(sentence_spans(long)) == 3
