"""The package PDF: title, one section per chapter, Unicode text intact."""

from __future__ import annotations

import io

import pypdf
import pytest

from tasks import pdf
from tasks.pdf import Chapter, render_package

CHAPTERS = [
    Chapter("Chapter 1 \u2013 Émile", "Hello wörld, “quoted” text.\n\nA second paragraph."),
    Chapter("Chapter 2", "The quick brown fox jumps over the lazy dog. " * 200),
]


def _read(data: bytes) -> pypdf.PdfReader:
    return pypdf.PdfReader(io.BytesIO(data))


def test_the_pdf_has_a_title_page_and_every_chapter_with_its_text() -> None:
    out = io.BytesIO()
    pages = render_package("A Tale of Two Cities", CHAPTERS, out)
    reader = _read(out.getvalue())
    assert len(reader.pages) == pages >= 3
    assert reader.metadata.title == "A Tale of Two Cities"
    text = "\n".join(page.extract_text() for page in reader.pages)
    assert "A Tale of Two Cities" in reader.pages[0].extract_text()
    assert "Chapter 1" in text and "Émile" in text and "wörld" in text
    assert "A second paragraph." in text
    assert text.count("quick brown fox") >= 150
    assert [item.title for item in reader.outline] == ["Chapter 1 \u2013 Émile", "Chapter 2"]


def test_without_a_unicode_font_text_is_folded_to_what_the_core_font_shows(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setenv(pdf.FONT_VARIABLE, str(tmp_path / "missing.ttf"))
    out = io.BytesIO()
    render_package("Ω title “x”", [Chapter("Café \u2014 one", "naïve Ω text")], out)
    text = "\n".join(page.extract_text() for page in _read(out.getvalue()).pages)
    assert "Café -- one" in text and "naïve ? text" in text and '? title "x"' in text
