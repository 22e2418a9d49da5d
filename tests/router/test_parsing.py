from pathlib import Path

import pytest

from fabric.errors import InvalidArgument
from router.parsing import format_for, parse
from tests.pdfmaker import make_pdf

SAMPLES = Path(__file__).resolve().parents[2] / "router" / "samples"


def test_format_from_extension_or_declaration():
    assert format_for("notes/a.MD") == "md"
    assert format_for("page.htm") == "html"
    assert format_for("README") == "txt"
    assert format_for("x.bin", "pdf") == "pdf"
    with pytest.raises(ValueError):
        format_for("x", "docx")


def test_html_keeps_prose_and_drops_script_and_style():
    text = parse((SAMPLES / "tcp-congestion.html").read_bytes(), "html")
    assert "slow start" in text.lower()
    assert "widgetBannerPlaceholderText" not in text
    assert "{" not in text  # no CSS


def test_markdown_markup_is_removed():
    text = parse(b"# Title\n\nSome **bold** and a [link](http://x.invalid).\n\n- item one\n", "md")
    assert text == "Title\n\nSome bold and a link.\n\nitem one"


def test_pdf_text_is_extracted():
    text = parse(make_pdf(["The lighthouse keeper trimmed the wick.", "Fresnel lenses focus light."]), "pdf")
    assert "lighthouse keeper" in text and "Fresnel" in text


@pytest.mark.parametrize(
    "data, fmt, message",
    [
        (b"%PDF-1.4 this is not really a pdf", "pdf", "cannot read the PDF"),
        (b"\x00\x01\x02binary", "txt", "binary"),
        (b"\xff\xfe\xfa not utf8", "txt", "UTF-8"),
        (b"   \n\n  ", "txt", "no text"),
        (b"<html><script>only()</script></html>", "html", "no text"),
    ],
)
def test_unreadable_documents_are_invalid_argument(data, fmt, message):
    with pytest.raises(InvalidArgument, match=message) as info:
        parse(data, fmt, field="documents[0]")
    assert info.value.field == "documents[0]"
