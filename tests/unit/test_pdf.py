"""The package PDF: title, one section per chapter, Unicode text intact."""

from __future__ import annotations

import io
import re

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


def test_a_contents_page_lists_each_chapter_at_the_page_it_starts_and_pages_are_numbered() -> None:
    # Part 2 takes pages of its own: the chapters after it move on.
    chapters = [Chapter(f"Part {n}", f"Text of part {n}. " * (600 if n == 2 else 20))
                for n in range(1, 36)]
    out = io.BytesIO()
    pages = render_package("Thirty-five parts", chapters, out)
    texts = [page.extract_text() for page in _read(out.getvalue()).pages]
    assert len(texts) == pages
    # Every page but the title page carries "n / N" at its foot.
    assert "/ " not in texts[0]
    assert all(re.search(rf"(^|\n){n} / {pages}($|\n)", text)
               for n, text in enumerate(texts[1:], start=2))
    # 35 chapters take two contents pages; each line's page starts that chapter.
    listed = dict(re.findall(r"^(\d+)\. Part \d+ (\d+)$", texts[1] + "\n" + texts[2], re.MULTILINE))
    assert "Contents" in texts[1] and len(listed) == 35
    for number, page in listed.items():
        assert texts[int(page) - 1].startswith(f"{number}. Part {number}\n") or (
            f"\n{number}. Part {number}\n" in texts[int(page) - 1]), (number, page)
    page = {int(number): int(at) for number, at in listed.items()}
    assert page[1] == 4  # after the title page and two contents pages
    assert page[3] - page[2] > 1 and page[35] - page[3] == 32


def test_each_demo_chapter_is_titled_by_the_authors_of_the_openings_it_holds() -> None:
    from tasks.demo import PASSAGES, demo_chapters

    chapters = demo_chapters(16)
    assert len({c.title for c in chapters}) == 16
    for chapter in chapters:
        held = [(work, author) for work, author, _, text in PASSAGES if text in chapter.text]
        assert len(held) == 4
        for work, author in held:
            assert f"From {work}, by {author}" in chapter.text
            assert author.rsplit(" ", 1)[-1] in chapter.title
