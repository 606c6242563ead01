"""The package as a PDF (fpdf2): a title page, a contents page (each
chapter's number, title and page, linked), then one section per chapter;
every page but the title page numbered "n / N" at its foot.

Text is Unicode. A TrueType font with wide coverage is used when the system
has one (DejaVu Sans, or the file named by ``PG_BROKER_PDF_FONT``); otherwise
the PDF core font Helvetica, which only knows Latin-1, so text is first folded
to what it can show (typographic quotes and dashes to ASCII, the rest to "?").
"""

from __future__ import annotations

import logging
import os
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fpdf import FPDF

log = logging.getLogger(__name__)
# fontTools (fpdf2's font subsetter) logs every table it prunes at INFO.
logging.getLogger("fontTools").setLevel(logging.WARNING)

CONTENT_TYPE = "application/pdf"
FONT_VARIABLE = "PG_BROKER_PDF_FONT"
_FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/local/share/fonts/DejaVuSans.ttf",
    "/Library/Fonts/DejaVuSans.ttf",
)
_LATIN1_FOLDS = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201c": '"', "\u201d": '"',
    "\u201e": '"', "\u2013": "-", "\u2014": "--", "\u2026": "...", "\u00a0": " ",
})


@dataclass(frozen=True)
class Chapter:
    title: str
    text: str


def unicode_font() -> Path | None:
    """A TrueType font covering most scripts, if the system has one."""
    configured = os.environ.get(FONT_VARIABLE, "").strip()
    candidates = (configured,) if configured else _FONT_CANDIDATES
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    if configured:
        log.warning("%s=%s is not a file; using the core font", FONT_VARIABLE, configured)
    return None


def to_latin1(text: str) -> str:
    """Text the core fonts can show: accents kept where Latin-1 has them."""
    folded = unicodedata.normalize("NFC", text.translate(_LATIN1_FOLDS))
    return folded.encode("latin-1", errors="replace").decode("latin-1")


CONTENTS_LINES = 30  # chapters per contents page (fewer than fit, heading included)


class _Package(FPDF):
    """fpdf2 calls ``footer`` as it closes each page."""

    body_font = "Helvetica"

    def footer(self) -> None:
        if self.page_no() == 1:  # the title page
            return
        self.set_y(-12)
        self.set_font(self.body_font, size=9)
        self.cell(0, 6, f"{self.page_no()} / {{nb}}", align="C")


def render_package(title: str, chapters: Sequence[Chapter], out: BinaryIO) -> int:
    """Write the package (title page, contents, then chapters) to ``out``; return pages."""
    pdf = _Package(format="A4")
    pdf.set_title(title)
    pdf.set_creator("pg_broker")
    pdf.set_auto_page_break(auto=True, margin=18)
    font = unicode_font()
    if font is not None:
        pdf.add_font("Body", "", str(font))
        pdf.body_font, clean = "Body", _identity
    else:
        clean = to_latin1

    pdf.add_page()
    pdf.set_font(pdf.body_font, size=26)
    pdf.ln(60)
    pdf.multi_cell(0, 13, clean(title), align="C")
    pdf.ln(8)
    pdf.set_font(pdf.body_font, size=12)
    pdf.multi_cell(0, 7, f"{len(chapters)} chapters", align="C")

    pdf.add_page()
    # One line per chapter, each cut to one line: the pages it takes are
    # known before the chapters are laid out, so their numbers hold.
    pdf.insert_toc_placeholder(_contents, pages=-(-len(chapters) // CONTENTS_LINES))

    for number, chapter in enumerate(chapters, start=1):
        if number > 1:  # the first starts on the page the contents broke to
            pdf.add_page()
        heading = clean(chapter.title) or f"Chapter {number}"
        pdf.start_section(heading)
        pdf.set_font(pdf.body_font, size=18)
        pdf.multi_cell(0, 10, f"{number}. {heading}")
        pdf.ln(4)
        pdf.set_font(pdf.body_font, size=11)
        for paragraph in chapter.text.split("\n\n"):
            if paragraph.strip():
                pdf.multi_cell(0, 6, clean(" ".join(paragraph.split())))
                pdf.ln(3)
    out.write(bytes(pdf.output()))
    return pdf.pages_count


def _contents(pdf: _Package, sections: list) -> None:
    """The contents page: one line per chapter, its page number right-aligned."""
    pdf.set_x(pdf.l_margin)
    pdf.set_font(pdf.body_font, size=18)
    pdf.multi_cell(0, 10, "Contents")
    pdf.ln(4)
    pdf.set_font(pdf.body_font, size=11)
    page_width = 16
    for number, section in enumerate(sections, start=1):
        if number > 1 and number % CONTENTS_LINES == 1:
            pdf.add_page()  # as many pages as render_package reserved
        link = pdf.add_link(page=section.page_number)
        name = f"{number}. {section.name}"
        while pdf.get_string_width(name) > pdf.epw - page_width - 2 and len(name) > 4:
            name = name[:-2] + "…" if pdf.body_font != "Helvetica" else name[:-4] + "..."
        pdf.cell(pdf.epw - page_width, 7, name, link=link)
        pdf.cell(page_width, 7, str(section.page_number), align="R", link=link,
                 new_x="LMARGIN", new_y="NEXT")


def _identity(text: str) -> str:
    return text
