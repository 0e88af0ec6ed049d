"""roff → plain text. Enough of man(7), mdoc(7), tbl and the pod2man/Tcl preambles for reading
the text of a man page; not a formatter (no filling, no adjusting, no page layout)."""
from __future__ import annotations

import re


_ROFF_GLYPHS = {
    "bu": "•", "em": "—", "en": "–", "hy": "-", "mi": "-", "lq": "“", "rq": "”", "oq": "‘", "cq": "’",
    "aq": "'", "dq": '"', "co": "©", "rg": "®", "tm": "™", "de": "°", "+-": "±", "mu": "×", "di": "÷",
    "<=": "≤", ">=": "≥", "!=": "≠", "==": "≡", "->": "→", "<-": "←", "sl": "/", "rs": "\\", "ga": "`",
    "aa": "´", "ti": "~", "ha": "^", "ul": "_", "ru": "_", "bv": "|", "br": "|", "or": "|", "dg": "†",
    "pd": "∂", "**": "*", "sc": "§", "eq": "=", "pl": "+", "Fo": "«", "Fc": "»", "S2": "²", "S1": "¹",
    "S3": "³", "12": "½", "14": "¼", "34": "¾", "ct": "¢", "Po": "£", "Eu": "€", "Ye": "¥",
    "*a": "α", "*b": "β", "*g": "γ", "*d": "δ", "*e": "ε", "*l": "λ", "*m": "μ", "*p": "π", "*s": "σ",
    "*W": "Ω", "*D": "Δ", "*S": "Σ", "*P": "Π",
}
# Strings defined by the pod2man preamble (as nroff sets them) and common man(7) ones.
_ROFF_STRINGS = {"C`": '"', "C'": '"', 'L"': "“", 'R"': "”", "--": "—", "PI": "π", "lq": "“",
                 "rq": "”", "q": '"', "Aq": "'", "Tm": "™", "R": "®", "C+": "C++", "Tr": "", "sd": ""}
_ROFF_DELIMITED = set("hvwoLlDXZbxRABCNSHVY?")  # \h'…' etc.: positioning, widths, drawing → nothing
_ROFF_SILENT = set("&|^,/%:)cdupraz{}jE")  # zero-width or layout-only single-character escapes
_ROFF_SINGLE = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "t": "\t", "'": "'",
                "`": "`", ".": ".", "\t": "\t", "_": "_"}

_ROFF_BREAK = {"PP", "LP", "P", "sp", "Sp", "Pp", "TP", "TQ", "HP", "IP", "SH", "SS", "Sh", "Ss", "Ip",
               "It", "Bl", "El", "Bd", "Ed", "bp", "RS", "RE", "nf", "fi", "Vb", "Ve", "CS", "CE", "ne",
               "TH", "Dt", "PD", "EX", "EE", "ti", "in", "Nd", "Dl", "UR", "MT", "LI", "Tp"}
_ROFF_ALT = {"BR", "RB", "IR", "RI", "BI", "IB", "SB"}  # alternating fonts: arguments run together
_ROFF_HIDDEN = {"IX", "Vb", "Ve", "CS", "CE", "VS", "VE", "AS", "BS", "BE", "RS", "RE", "PD", "TH",
                "Dd", "Dt", "Os", "Bl", "El", "Bd", "Ed", "Ek", "Bk", "EX", "EE", "UR", "UE", "MT", "ME",
                "Sp", "DT", "UC", "AT", "ft", "so", "LI", "Tp", "Pp", "PP", "LP", "P", "HP", "TP", "TQ"}
_MDOC_WORDS = {"Ar", "Cm", "Dv", "Em", "Er", "Ev", "Fa", "Fl", "Ic", "Li", "Nm", "Pa", "Sy", "Va", "Xr",
               "Op", "Oo", "Oc", "Dq", "Do", "Dc", "Pq", "Po", "Pc", "Ql", "Qq", "Sq", "So", "Sc", "Ns",
               "No", "Sx", "Tn", "Ux", "Bx", "At", "Ad", "Cd", "Fn", "Ft", "Fo", "Fc", "St", "Lk", "Mt",
               "Aq", "Bq", "Brq", "Eq", "Ms", "An", "Lb", "Ot", "Vt", "Dl", "Nd", "It", "Sh", "Ss", "Ek"}


def _roff_escapes(s: str) -> str:
    """Resolve the inline escapes of one line: fonts, sizes, glyphs, strings, motions."""
    out: list[str] = []
    i, n = 0, len(s)

    def name_at(j: int) -> tuple[str, int]:  # `x`, `(xx` or `[name]` starting at s[j]
        if j >= n:
            return "", j
        if s[j] == "(":
            return s[j + 1:j + 3], j + 3
        if s[j] == "[":
            end = s.find("]", j)
            return (s[j + 1:end], end + 1) if end >= 0 else (s[j + 1:], n)
        return s[j], j + 1

    while i < n:
        c = s[i]
        if c != "\\" or i + 1 >= n:
            out.append(c)
            i += 1
            continue
        e = s[i + 1]
        i += 2
        if e in "\"#":  # comment: the rest of the line
            break
        if e == "f" or e == "F" or e == "m" or e == "M" or e == "k" or e == "g" or e == "n" or e == "$":
            if e == "n" and i < n and s[i] in "+-":
                i += 1
            _, i = name_at(i)
        elif e == "s":
            if i < n and s[i] in "+-":
                i += 1
            if i < n and s[i] in "([":
                _, i = name_at(i)
            elif i < n and s[i] == "'":
                end = s.find("'", i + 1)
                i = end + 1 if end >= 0 else n
            else:
                j = i
                while j < n and j < i + 2 and s[j].isdigit():
                    j += 1
                # \s1x..\s3x take two digits, others one (classic troff)
                i = j if j - i == 2 and s[i] in "123" else min(j, i + 1)
        elif e == "(" or e == "[":
            glyph, i = name_at(i - 1)
            if glyph.startswith("u") and re.fullmatch(r"u[0-9A-Fa-f]{4,6}", glyph):
                out.append(chr(int(glyph[1:], 16)))
            else:
                out.append(_ROFF_GLYPHS.get(glyph, ""))
        elif e == "*":
            name, i = name_at(i)
            out.append(_ROFF_STRINGS.get(name, ""))
        elif e in _ROFF_DELIMITED:
            if i < n:
                end = s.find(s[i], i + 1)
                i = end + 1 if end >= 0 else n
        elif e in _ROFF_SILENT:
            pass
        elif e in _ROFF_SINGLE:
            out.append(_ROFF_SINGLE[e])
        else:  # unknown escape: troff prints the character
            out.append(e)
    return "".join(out)


def _roff_uncomment(line: str) -> str:
    """The line up to an (unescaped) `\\"` comment."""
    i = 0
    while i < len(line) - 1:
        if line[i] == "\\":
            if line[i + 1] == '"':
                return line[:i]
            i += 2
        else:
            i += 1
    return line


def _roff_args(rest: str) -> list[str]:
    """Macro arguments: blank-separated, `"…"` quotes a blank, `""` inside quotes is a quote."""
    args: list[str] = []
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t":
            i += 1
        if i >= n:
            break
        if rest[i] == '"':
            i += 1
            buf = []
            while i < n:
                if rest[i] == '"':
                    if i + 1 < n and rest[i + 1] == '"':
                        buf.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                if rest[i] == "\\" and i + 1 < n:
                    buf.append(rest[i:i + 2])
                    i += 2
                    continue
                buf.append(rest[i])
                i += 1
            args.append("".join(buf))
        else:
            j = i
            while j < n and rest[j] not in " \t":
                j += 2 if rest[j] == "\\" else 1
            args.append(rest[i:j])
            i = j
    return args


def _mdoc_line(name: str, args: list[str], state: dict[str, str]) -> str:
    """An mdoc(7) line: macro names among the arguments are calls (`.Op Fl a Ar file` → `[-a file]`)."""
    words = [name, *args]
    out: list[str] = []
    closers: list[str] = []
    glue = False
    k = 0
    while k < len(words):
        w = words[k]
        k += 1
        piece: str | None = None
        if w in _MDOC_WORDS:
            if w == "Fl":
                nxt = words[k] if k < len(words) and words[k] not in _MDOC_WORDS else ""
                k += 1 if nxt else 0
                piece = "-" + nxt
            elif w == "Xr" and k + 1 < len(words):
                piece = f"{words[k]}({words[k + 1]})"
                k += 2
            elif w == "Nm":
                if k < len(words) and words[k] not in _MDOC_WORDS:
                    state.setdefault("Nm", words[k])
                    piece = words[k]
                    k += 1
                else:
                    piece = state.get("Nm", "")
            elif w in ("Op", "Oo"):
                out.append("[")
                glue = True
                if w == "Op":
                    closers.append("]")
            elif w in ("Oc",):
                piece, glue = "]", True
            elif w in ("Dq", "Do", "Qq"):
                out.append("“" if w != "Qq" else '"')
                glue = True
                if w != "Do":
                    closers.append("”" if w == "Dq" else '"')
            elif w == "Dc":
                piece, glue = "”", True
            elif w in ("Sq", "So", "Ql"):
                out.append("‘")
                glue = True
                if w != "So":
                    closers.append("’")
            elif w == "Sc":
                piece, glue = "’", True
            elif w in ("Pq", "Po"):
                out.append("(")
                glue = True
                if w == "Pq":
                    closers.append(")")
            elif w == "Pc":
                piece, glue = ")", True
            elif w == "Aq":
                out.append("<")
                glue = True
                closers.append(">")
            elif w == "Ns":
                glue = True
            elif w == "Nd":
                piece = "-"
            if piece is None:
                continue
        else:
            piece = w
        if piece:
            if out and not glue and not (piece in ".,;:)]!?" and len(piece) == 1):
                out.append(" ")
            out.append(piece)
            glue = False
    for closer in reversed(closers):
        out.append(closer)
    return "".join(out)


def roff_to_text(src: str) -> str:
    """The readable text of a man page in roff (man or mdoc): requests, macros and escapes gone.

    Macro definitions (`.de`…`..`), ignored blocks, conditionals (`.if`/`.ie`/`.el` with their
    `\\{…\\}` bodies: presentation setup in the pod2man and Tcl preambles), eqn and pic blocks
    are dropped; headings and font macros keep their arguments; tbl rows keep their cells.
    Each input text line stays one output line; paragraph macros become blank lines.
    """
    raw = src.replace("\r\n", "\n").split("\n")
    lines: list[str] = []
    for line in raw:  # a line ending in an unescaped backslash continues on the next
        if lines and lines[-1].endswith("\\") and (len(lines[-1]) - len(lines[-1].rstrip("\\"))) % 2:
            lines[-1] = lines[-1][:-1] + line
        else:
            lines.append(line)
    out: list[str] = []
    state: dict[str, str] = {}
    skip_until: str | None = None  # end of a .de/.ig/.EQ/.PS block
    depth = 0  # open \{ of a dropped conditional
    table = ""  # "" | "format" | "data"
    tab = "\t"

    def brk() -> None:
        if out and out[-1] != "":
            out.append("")

    for line in lines:
        if depth > 0:
            depth += line.count("\\{") - line.count("\\}")
            continue
        if skip_until is not None:
            if re.match(r"[.'][ \t]*" + re.escape(skip_until) + r"\s*$", line):
                skip_until = None
            continue
        m = re.match(r"[.'][ \t]*([^\s\\]*)(.*)$", line)
        if table == "format":
            if m is None or not m.group(1):
                tabs = re.search(r"tab\s*\((.)\)", line)
                if tabs:
                    tab = tabs.group(1)
                if line.rstrip().endswith("."):
                    table = "data"
                continue
        if m is None:  # a text line
            if table == "data":
                if line.strip() in ("_", "=", "T{", "T}", ".T&"):
                    continue
                line = line.replace("T}", "").replace("T{", "")
                if tab != "\t":
                    line = line.replace(tab, "\t")
            text = _roff_escapes(line).rstrip()
            if text.strip() or not out or out[-1] != "":
                out.append(text)
            continue
        name, rest = m.group(1), _roff_uncomment(m.group(2))
        if not name:  # `.` alone or a comment line `.\"`
            continue
        if name in ("de", "de1", "am", "am1", "ig"):  # `.de NAME [END]`, `.ig [END]`; END is `..`
            words = _roff_args(rest)
            end = words[0] if name == "ig" and words else words[1] if name != "ig" and len(words) > 1 else "."
            skip_until = end
            continue
        if name in ("if", "ie", "el", "while"):
            depth = rest.count("\\{") - rest.count("\\}")
            continue
        if name == "EQ" or name == "PS":
            skip_until = "EN" if name == "EQ" else "PE"
            continue
        if name == "TS":
            brk()
            table, tab = "format", "\t"
            continue
        if name == "TE":
            table = ""
            brk()
            continue
        args = _roff_args(rest)
        if name in _ROFF_BREAK:
            brk()
        if name == "TH" and args:
            out.append(f"{_roff_escapes(args[0])}({_roff_escapes(args[1])})" if len(args) > 1 else
                       _roff_escapes(args[0]))
            out.append("")
        elif name in ("SH", "SS", "Sh", "Ss"):
            if args:
                out.append(_roff_escapes(" ".join(args)))
        elif name in ("IP", "Ip") and args and not re.fullmatch(r"[\d.]+[nmiuvcP]?", args[0]):
            out.append(_roff_escapes(args[0]))
        elif name in _ROFF_ALT:
            out.append(_roff_escapes("".join(args)))
        elif name in ("B", "I", "SM", "R", "UE", "ME", "Dl", "LI"):
            if args:
                out.append(_roff_escapes(" ".join(args)))
        elif name in _MDOC_WORDS or name in ("Nd",):
            text = _roff_escapes(_mdoc_line(name, args, state)).strip()
            if text:
                out.append(text)
        elif name in _ROFF_HIDDEN or name in _ROFF_BREAK or name[:1].islower() or name[:1] in ".'\\":
            continue  # layout requests and presentation macros
        elif args:  # an unknown macro with arguments (Tcl's .AP, .OP, ...): keep the words
            out.append(_roff_escapes(" ".join(args)))
    text = "\n".join(ln.rstrip() for ln in out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"
