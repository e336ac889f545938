//! The homoglyph table of the *latin* view: letters of other scripts, and
//! Latin letters of other shapes, that pass for the Latin letters the rules
//! spell. Derived once from Unicode's confusables.txt (Unicode Technical
//! Standard #39, Unicode 18.0, as the `unicode-security` crate 0.1.3
//! tabulates it), not by hand, so that no look-alike of a letter is left
//! out by oversight; a table rather than UTS #39's skeleton, which maps
//! whole strings to prototypes the rules could not be written in (`m` is
//! `rn` there).
//!
//! An entry `(c, x)` is in the table when `c` is a letter (general
//! category Ll, Lo or Lm), not ASCII, unchanged by NFKC and lower-casing
//! (the view is both already), and
//! - confusables.txt maps `c` to one ASCII letter, `x` lower-cased (after
//!   dropping combining marks: `ø` is `o` with a stroke overlay there), or
//!   to a prototype that stands for a Latin small capital letter (not a
//!   reversed or turned one), `x` being that letter (`н` is `ʜ`; `м` is
//!   `ʍ`, the prototype of `ᴍ`);
//! - or, failing that, confusables.txt maps a capital whose lower case is
//!   `c` so: the view lower-cases before it maps, so `Μ` (Greek capital
//!   mu, `M`) arrives as `μ`, and `μ` maps to `m`. A capital that passes
//!   for `I` adds nothing: its lower case need not look like an `i`.
//!
//! Where the two disagree the letter's own entry wins (`η` is `n`, though
//! `Η` is `H`). Plus `ё`, which confusables.txt does not list (a letter
//! with a diaeresis), kept from the earlier hand-made table. All 26 letters
//! are covered, though the rules use neither `q` nor `z`.

/// `(homoglyph, the ASCII lower-case letter it passes for)`, sorted by the
/// homoglyph for a binary search (see [`crate::map`]).
pub(crate) const HOMOGLYPHS: &[(char, char)] = &[
    ('\u{00F0}', 'd'),  // LATIN SMALL LETTER ETH
    ('\u{00F8}', 'o'),  // LATIN SMALL LETTER O WITH STROKE
    ('\u{00FE}', 'p'),  // LATIN SMALL LETTER THORN
    ('\u{0111}', 'd'),  // LATIN SMALL LETTER D WITH STROKE
    ('\u{0127}', 'h'),  // LATIN SMALL LETTER H WITH STROKE
    ('\u{0131}', 'i'),  // LATIN SMALL LETTER DOTLESS I
    ('\u{0138}', 'k'),  // LATIN SMALL LETTER KRA
    ('\u{0142}', 'l'),  // LATIN SMALL LETTER L WITH STROKE
    ('\u{014B}', 'n'),  // LATIN SMALL LETTER ENG
    ('\u{0167}', 't'),  // LATIN SMALL LETTER T WITH STROKE
    ('\u{0180}', 'b'),  // LATIN SMALL LETTER B WITH STROKE
    ('\u{0183}', 'b'),  // LATIN SMALL LETTER B WITH TOPBAR
    ('\u{0185}', 'b'),  // LATIN SMALL LETTER TONE SIX
    ('\u{018C}', 'd'),  // LATIN SMALL LETTER D WITH TOPBAR
    ('\u{018D}', 'g'),  // LATIN SMALL LETTER TURNED DELTA
    ('\u{0192}', 'f'),  // LATIN SMALL LETTER F WITH HOOK
    ('\u{0199}', 'k'),  // LATIN SMALL LETTER K WITH HOOK
    ('\u{019A}', 'l'),  // LATIN SMALL LETTER L WITH BAR
    ('\u{019E}', 'n'),  // LATIN SMALL LETTER N WITH LONG RIGHT LEG
    ('\u{01A5}', 'p'),  // LATIN SMALL LETTER P WITH HOOK
    ('\u{01AB}', 't'),  // LATIN SMALL LETTER T WITH PALATAL HOOK
    ('\u{01AD}', 't'),  // LATIN SMALL LETTER T WITH HOOK
    ('\u{01B4}', 'y'),  // LATIN SMALL LETTER Y WITH HOOK
    ('\u{01B6}', 'z'),  // LATIN SMALL LETTER Z WITH STROKE
    ('\u{01BD}', 's'),  // LATIN SMALL LETTER TONE FIVE
    ('\u{01BF}', 'p'),  // LATIN LETTER WYNN
    ('\u{01C0}', 'l'),  // LATIN LETTER DENTAL CLICK
    ('\u{01E5}', 'g'),  // LATIN SMALL LETTER G WITH STROKE
    ('\u{0225}', 'z'),  // LATIN SMALL LETTER Z WITH HOOK
    ('\u{0237}', 'j'),  // LATIN SMALL LETTER DOTLESS J
    ('\u{023C}', 'c'),  // LATIN SMALL LETTER C WITH STROKE
    ('\u{0247}', 'e'),  // LATIN SMALL LETTER E WITH STROKE
    ('\u{0249}', 'j'),  // LATIN SMALL LETTER J WITH STROKE
    ('\u{024D}', 'r'),  // LATIN SMALL LETTER R WITH STROKE
    ('\u{024F}', 'y'),  // LATIN SMALL LETTER Y WITH STROKE
    ('\u{0251}', 'a'),  // LATIN SMALL LETTER ALPHA
    ('\u{0253}', 'b'),  // LATIN SMALL LETTER B WITH HOOK
    ('\u{0256}', 'd'),  // LATIN SMALL LETTER D WITH TAIL
    ('\u{0257}', 'd'),  // LATIN SMALL LETTER D WITH HOOK
    ('\u{025F}', 'j'),  // LATIN SMALL LETTER DOTLESS J WITH STROKE
    ('\u{0260}', 'g'),  // LATIN SMALL LETTER G WITH HOOK
    ('\u{0261}', 'g'),  // LATIN SMALL LETTER SCRIPT G
    ('\u{0262}', 'g'),  // LATIN LETTER SMALL CAPITAL G
    ('\u{0263}', 'y'),  // LATIN SMALL LETTER GAMMA
    ('\u{0266}', 'h'),  // LATIN SMALL LETTER H WITH HOOK
    ('\u{0268}', 'i'),  // LATIN SMALL LETTER I WITH STROKE
    ('\u{0269}', 'i'),  // LATIN SMALL LETTER IOTA
    ('\u{026A}', 'i'),  // LATIN LETTER SMALL CAPITAL I
    ('\u{026B}', 'l'),  // LATIN SMALL LETTER L WITH MIDDLE TILDE
    ('\u{026D}', 'l'),  // LATIN SMALL LETTER L WITH RETROFLEX HOOK
    ('\u{026F}', 'w'),  // LATIN SMALL LETTER TURNED M
    ('\u{0272}', 'n'),  // LATIN SMALL LETTER N WITH LEFT HOOK
    ('\u{0273}', 'n'),  // LATIN SMALL LETTER N WITH RETROFLEX HOOK
    ('\u{0274}', 'n'),  // LATIN LETTER SMALL CAPITAL N
    ('\u{0275}', 'o'),  // LATIN SMALL LETTER BARRED O
    ('\u{027C}', 'r'),  // LATIN SMALL LETTER R WITH LONG LEG
    ('\u{027D}', 'r'),  // LATIN SMALL LETTER R WITH TAIL
    ('\u{0280}', 'r'),  // LATIN LETTER SMALL CAPITAL R
    ('\u{0282}', 's'),  // LATIN SMALL LETTER S WITH HOOK
    ('\u{0284}', 'f'),  // LATIN SMALL LETTER DOTLESS J WITH STROKE AND HOOK
    ('\u{0288}', 't'),  // LATIN SMALL LETTER T WITH RETROFLEX HOOK
    ('\u{0289}', 'u'),  // LATIN SMALL LETTER U BAR
    ('\u{028B}', 'u'),  // LATIN SMALL LETTER V WITH HOOK
    ('\u{028D}', 'm'),  // LATIN SMALL LETTER TURNED W
    ('\u{028F}', 'y'),  // LATIN LETTER SMALL CAPITAL Y
    ('\u{0290}', 'z'),  // LATIN SMALL LETTER Z WITH RETROFLEX HOOK
    ('\u{0299}', 'b'),  // LATIN LETTER SMALL CAPITAL B
    ('\u{029C}', 'h'),  // LATIN LETTER SMALL CAPITAL H
    ('\u{029D}', 'j'),  // LATIN SMALL LETTER J WITH CROSSED-TAIL
    ('\u{029F}', 'l'),  // LATIN LETTER SMALL CAPITAL L
    ('\u{02A0}', 'q'),  // LATIN SMALL LETTER Q WITH HOOK
    ('\u{03B1}', 'a'),  // GREEK SMALL LETTER ALPHA
    ('\u{03B2}', 'b'),  // GREEK SMALL LETTER BETA
    ('\u{03B3}', 'y'),  // GREEK SMALL LETTER GAMMA
    ('\u{03B5}', 'e'),  // GREEK SMALL LETTER EPSILON
    ('\u{03B6}', 'z'),  // GREEK SMALL LETTER ZETA
    ('\u{03B7}', 'n'),  // GREEK SMALL LETTER ETA
    ('\u{03B8}', 'o'),  // GREEK SMALL LETTER THETA
    ('\u{03B9}', 'i'),  // GREEK SMALL LETTER IOTA
    ('\u{03BA}', 'k'),  // GREEK SMALL LETTER KAPPA
    ('\u{03BC}', 'm'),  // GREEK SMALL LETTER MU
    ('\u{03BD}', 'v'),  // GREEK SMALL LETTER NU
    ('\u{03BF}', 'o'),  // GREEK SMALL LETTER OMICRON
    ('\u{03C1}', 'p'),  // GREEK SMALL LETTER RHO
    ('\u{03C2}', 'c'),  // GREEK SMALL LETTER FINAL SIGMA (and NFKC's GREEK LUNATE SIGMA SYMBOL)
    ('\u{03C3}', 'o'),  // GREEK SMALL LETTER SIGMA
    ('\u{03C4}', 't'),  // GREEK SMALL LETTER TAU
    ('\u{03C5}', 'u'),  // GREEK SMALL LETTER UPSILON
    ('\u{03C7}', 'x'),  // GREEK SMALL LETTER CHI
    ('\u{03DD}', 'f'),  // GREEK SMALL LETTER DIGAMMA
    ('\u{03ED}', 'o'),  // COPTIC SMALL LETTER SHIMA
    ('\u{03F3}', 'j'),  // GREEK LETTER YOT
    ('\u{03F8}', 'p'),  // GREEK SMALL LETTER SHO
    ('\u{03FB}', 'm'),  // GREEK SMALL LETTER SAN
    ('\u{0430}', 'a'),  // CYRILLIC SMALL LETTER A
    ('\u{0431}', 'b'),  // CYRILLIC SMALL LETTER BE
    ('\u{0432}', 'b'),  // CYRILLIC SMALL LETTER VE
    ('\u{0433}', 'r'),  // CYRILLIC SMALL LETTER GHE
    ('\u{0435}', 'e'),  // CYRILLIC SMALL LETTER IE
    ('\u{043A}', 'k'),  // CYRILLIC SMALL LETTER KA
    ('\u{043C}', 'm'),  // CYRILLIC SMALL LETTER EM
    ('\u{043D}', 'h'),  // CYRILLIC SMALL LETTER EN
    ('\u{043E}', 'o'),  // CYRILLIC SMALL LETTER O
    ('\u{0440}', 'p'),  // CYRILLIC SMALL LETTER ER
    ('\u{0441}', 'c'),  // CYRILLIC SMALL LETTER ES
    ('\u{0442}', 't'),  // CYRILLIC SMALL LETTER TE
    ('\u{0443}', 'y'),  // CYRILLIC SMALL LETTER U
    ('\u{0445}', 'x'),  // CYRILLIC SMALL LETTER HA
    ('\u{0448}', 'w'),  // CYRILLIC SMALL LETTER SHA
    ('\u{044C}', 'b'),  // CYRILLIC SMALL LETTER SOFT SIGN
    ('\u{0451}', 'e'),  // CYRILLIC SMALL LETTER IO (not in confusables.txt: kept from the earlier table)
    ('\u{0455}', 's'),  // CYRILLIC SMALL LETTER DZE
    ('\u{0456}', 'i'),  // CYRILLIC SMALL LETTER BYELORUSSIAN-UKRAINIAN I
    ('\u{0458}', 'j'),  // CYRILLIC SMALL LETTER JE
    ('\u{045B}', 'h'),  // CYRILLIC SMALL LETTER TSHE
    ('\u{045F}', 'u'),  // CYRILLIC SMALL LETTER DZHE
    ('\u{0461}', 'w'),  // CYRILLIC SMALL LETTER OMEGA
    ('\u{0463}', 'b'),  // CYRILLIC SMALL LETTER YAT
    ('\u{0473}', 'o'),  // CYRILLIC SMALL LETTER FITA
    ('\u{0475}', 'v'),  // CYRILLIC SMALL LETTER IZHITSA
    ('\u{047D}', 'w'),  // CYRILLIC SMALL LETTER OMEGA WITH TITLO
    ('\u{048D}', 'b'),  // CYRILLIC SMALL LETTER SEMISOFT SIGN
    ('\u{0493}', 'r'),  // CYRILLIC SMALL LETTER GHE WITH STROKE
    ('\u{049B}', 'k'),  // CYRILLIC SMALL LETTER KA WITH DESCENDER
    ('\u{049F}', 'k'),  // CYRILLIC SMALL LETTER KA WITH STROKE
    ('\u{04A3}', 'h'),  // CYRILLIC SMALL LETTER EN WITH DESCENDER
    ('\u{04AB}', 'c'),  // CYRILLIC SMALL LETTER ES WITH DESCENDER
    ('\u{04AD}', 't'),  // CYRILLIC SMALL LETTER TE WITH DESCENDER
    ('\u{04AF}', 'y'),  // CYRILLIC SMALL LETTER STRAIGHT U
    ('\u{04B1}', 'y'),  // CYRILLIC SMALL LETTER STRAIGHT U WITH STROKE
    ('\u{04B3}', 'x'),  // CYRILLIC SMALL LETTER HA WITH DESCENDER
    ('\u{04BB}', 'h'),  // CYRILLIC SMALL LETTER SHHA
    ('\u{04BD}', 'e'),  // CYRILLIC SMALL LETTER ABKHASIAN CHE
    ('\u{04BF}', 'e'),  // CYRILLIC SMALL LETTER ABKHASIAN CHE WITH DESCENDER
    ('\u{04C8}', 'h'),  // CYRILLIC SMALL LETTER EN WITH HOOK
    ('\u{04CA}', 'h'),  // CYRILLIC SMALL LETTER EN WITH TAIL
    ('\u{04CE}', 'm'),  // CYRILLIC SMALL LETTER EM WITH TAIL
    ('\u{04CF}', 'l'),  // CYRILLIC SMALL LETTER PALOCHKA
    ('\u{04E9}', 'o'),  // CYRILLIC SMALL LETTER BARRED O
    ('\u{0501}', 'd'),  // CYRILLIC SMALL LETTER KOMI DE
    ('\u{050D}', 'g'),  // CYRILLIC SMALL LETTER KOMI SJE
    ('\u{051B}', 'q'),  // CYRILLIC SMALL LETTER QA
    ('\u{051D}', 'w'),  // CYRILLIC SMALL LETTER WE
    ('\u{0561}', 'w'),  // ARMENIAN SMALL LETTER AYB
    ('\u{0563}', 'q'),  // ARMENIAN SMALL LETTER GIM
    ('\u{0566}', 'q'),  // ARMENIAN SMALL LETTER ZA
    ('\u{0570}', 'h'),  // ARMENIAN SMALL LETTER HO
    ('\u{0572}', 'n'),  // ARMENIAN SMALL LETTER GHAD
    ('\u{0575}', 'j'),  // ARMENIAN SMALL LETTER YI
    ('\u{0578}', 'n'),  // ARMENIAN SMALL LETTER VO
    ('\u{057C}', 'n'),  // ARMENIAN SMALL LETTER RA
    ('\u{057D}', 'u'),  // ARMENIAN SMALL LETTER SEH
    ('\u{057F}', 's'),  // ARMENIAN SMALL LETTER TIWN
    ('\u{0581}', 'g'),  // ARMENIAN SMALL LETTER CO
    ('\u{0582}', 'i'),  // ARMENIAN SMALL LETTER YIWN
    ('\u{0584}', 'f'),  // ARMENIAN SMALL LETTER KEH
    ('\u{0585}', 'o'),  // ARMENIAN SMALL LETTER OH
    ('\u{05D5}', 'l'),  // HEBREW LETTER VAV
    ('\u{05D8}', 'v'),  // HEBREW LETTER TET
    ('\u{05DF}', 'l'),  // HEBREW LETTER FINAL NUN
    ('\u{05E1}', 'o'),  // HEBREW LETTER SAMEKH
    ('\u{0627}', 'l'),  // ARABIC LETTER ALEF
    ('\u{0629}', 'o'),  // ARABIC LETTER TEH MARBUTA
    ('\u{0647}', 'o'),  // ARABIC LETTER HEH
    ('\u{0673}', 'l'),  // ARABIC LETTER ALEF WITH WAVY HAMZA BELOW
    ('\u{06BE}', 'o'),  // ARABIC LETTER HEH DOACHASHMEE
    ('\u{06C0}', 'o'),  // ARABIC LETTER HEH WITH YEH ABOVE
    ('\u{06C1}', 'o'),  // ARABIC LETTER HEH GOAL
    ('\u{06C3}', 'o'),  // ARABIC LETTER TEH MARBUTA GOAL
    ('\u{06D5}', 'o'),  // ARABIC LETTER AE
    ('\u{06FF}', 'o'),  // ARABIC LETTER HEH WITH INVERTED V
    ('\u{07CA}', 'l'),  // NKO LETTER A
    ('\u{07CB}', 'o'),  // NKO LETTER EE
    ('\u{07CC}', 'y'),  // NKO LETTER I
    ('\u{07D3}', 'f'),  // NKO LETTER BA
    ('\u{07D5}', 'b'),  // NKO LETTER TA
    ('\u{07E0}', 't'),  // NKO LETTER NA WOLOSO
    ('\u{0840}', 'o'),  // MANDAIC LETTER HALQA
    ('\u{0B20}', 'o'),  // ORIYA LETTER TTHA
    ('\u{0D1F}', 's'),  // MALAYALAM LETTER TTA
    ('\u{0D20}', 'o'),  // MALAYALAM LETTER TTHA
    ('\u{1004}', 'c'),  // MYANMAR LETTER NGA
    ('\u{1010}', 'o'),  // MYANMAR LETTER TA
    ('\u{101D}', 'o'),  // MYANMAR LETTER WA
    ('\u{105A}', 'c'),  // MYANMAR LETTER MON NGA
    ('\u{10D7}', 'o'),  // GEORGIAN LETTER TAN
    ('\u{10E7}', 'y'),  // GEORGIAN LETTER QAR
    ('\u{10FD}', 's'),  // GEORGIAN LETTER AEN
    ('\u{10FF}', 'o'),  // GEORGIAN LETTER LABIAL SIGN
    ('\u{110B}', 'o'),  // HANGUL CHOSEONG IEUNG
    ('\u{11BC}', 'o'),  // HANGUL JONGSEONG IEUNG
    ('\u{1200}', 'u'),  // ETHIOPIC SYLLABLE HA
    ('\u{12D0}', 'o'),  // ETHIOPIC SYLLABLE PHARYNGEAL A
    ('\u{1340}', 'o'),  // ETHIOPIC SYLLABLE TZA
    ('\u{13FA}', 'h'),  // CHEROKEE SMALL LETTER YO
    ('\u{13FB}', 'g'),  // CHEROKEE SMALL LETTER YU
    ('\u{13FC}', 'b'),  // CHEROKEE SMALL LETTER YV
    ('\u{142F}', 'v'),  // CANADIAN SYLLABICS PE
    ('\u{144C}', 'u'),  // CANADIAN SYLLABICS TE
    ('\u{146D}', 'p'),  // CANADIAN SYLLABICS KI
    ('\u{146F}', 'd'),  // CANADIAN SYLLABICS KO
    ('\u{1472}', 'b'),  // CANADIAN SYLLABICS KA
    ('\u{1473}', 'b'),  // CANADIAN SYLLABICS KAA
    ('\u{148D}', 'j'),  // CANADIAN SYLLABICS CO
    ('\u{14AA}', 'l'),  // CANADIAN SYLLABICS MA
    ('\u{1541}', 'x'),  // CANADIAN SYLLABICS SAYISI YI
    ('\u{157C}', 'h'),  // CANADIAN SYLLABICS NUNAVUT H
    ('\u{157D}', 'x'),  // CANADIAN SYLLABICS HK
    ('\u{1587}', 'r'),  // CANADIAN SYLLABICS TLHI
    ('\u{15AF}', 'b'),  // CANADIAN SYLLABICS AIVILIK B
    ('\u{15B4}', 'f'),  // CANADIAN SYLLABICS BLACKFOOT WE
    ('\u{15C5}', 'a'),  // CANADIAN SYLLABICS CARRIER GHO
    ('\u{15DE}', 'd'),  // CANADIAN SYLLABICS CARRIER THE
    ('\u{15EA}', 'd'),  // CANADIAN SYLLABICS CARRIER PE
    ('\u{15F0}', 'm'),  // CANADIAN SYLLABICS CARRIER GO
    ('\u{15F7}', 'b'),  // CANADIAN SYLLABICS CARRIER KHE
    ('\u{16B7}', 'x'),  // RUNIC LETTER GEBO GYFU G
    ('\u{16C1}', 'l'),  // RUNIC LETTER ISAZ IS ISS I
    ('\u{16C5}', 'l'),  // RUNIC LETTER LONG-BRANCH-AR AE
    ('\u{16D0}', 'l'),  // RUNIC LETTER SHORT-TWIG-TYR T
    ('\u{16D5}', 'k'),  // RUNIC LETTER OPEN-P
    ('\u{16D6}', 'm'),  // RUNIC LETTER EHWAZ EH E
    ('\u{1763}', 'x'),  // TAGBANWA LETTER KA
    ('\u{1A32}', 'o'),  // TAI THAM LETTER HIGH TA
    ('\u{1A45}', 'o'),  // TAI THAM LETTER WA
    ('\u{1C82}', 'o'),  // CYRILLIC SMALL LETTER NARROW O
    ('\u{1C83}', 'c'),  // CYRILLIC SMALL LETTER WIDE ES
    ('\u{1CF5}', 'x'),  // VEDIC SIGN JIHVAMULIYA
    ('\u{1D00}', 'a'),  // LATIN LETTER SMALL CAPITAL A
    ('\u{1D04}', 'c'),  // LATIN LETTER SMALL CAPITAL C
    ('\u{1D05}', 'd'),  // LATIN LETTER SMALL CAPITAL D
    ('\u{1D07}', 'e'),  // LATIN LETTER SMALL CAPITAL E
    ('\u{1D0A}', 'j'),  // LATIN LETTER SMALL CAPITAL J
    ('\u{1D0B}', 'k'),  // LATIN LETTER SMALL CAPITAL K
    ('\u{1D0D}', 'm'),  // LATIN LETTER SMALL CAPITAL M
    ('\u{1D0F}', 'o'),  // LATIN LETTER SMALL CAPITAL O
    ('\u{1D11}', 'o'),  // LATIN SMALL LETTER SIDEWAYS O
    ('\u{1D18}', 'p'),  // LATIN LETTER SMALL CAPITAL P
    ('\u{1D1B}', 't'),  // LATIN LETTER SMALL CAPITAL T
    ('\u{1D1C}', 'u'),  // LATIN LETTER SMALL CAPITAL U
    ('\u{1D20}', 'v'),  // LATIN LETTER SMALL CAPITAL V
    ('\u{1D21}', 'w'),  // LATIN LETTER SMALL CAPITAL W
    ('\u{1D22}', 'z'),  // LATIN LETTER SMALL CAPITAL Z
    ('\u{1D26}', 'r'),  // GREEK LETTER SMALL CAPITAL GAMMA
    ('\u{1D29}', 'p'),  // GREEK LETTER SMALL CAPITAL RHO
    ('\u{1D6E}', 'f'),  // LATIN SMALL LETTER F WITH MIDDLE TILDE
    ('\u{1D70}', 'n'),  // LATIN SMALL LETTER N WITH MIDDLE TILDE
    ('\u{1D72}', 'r'),  // LATIN SMALL LETTER R WITH MIDDLE TILDE
    ('\u{1D74}', 's'),  // LATIN SMALL LETTER S WITH MIDDLE TILDE
    ('\u{1D75}', 't'),  // LATIN SMALL LETTER T WITH MIDDLE TILDE
    ('\u{1D76}', 'z'),  // LATIN SMALL LETTER Z WITH MIDDLE TILDE
    ('\u{1D7B}', 'i'),  // LATIN SMALL CAPITAL LETTER I WITH STROKE
    ('\u{1D7C}', 'i'),  // LATIN SMALL LETTER IOTA WITH STROKE
    ('\u{1D7D}', 'p'),  // LATIN SMALL LETTER P WITH STROKE
    ('\u{1D7E}', 'u'),  // LATIN SMALL CAPITAL LETTER U WITH STROKE
    ('\u{1D83}', 'g'),  // LATIN SMALL LETTER G WITH PALATAL HOOK
    ('\u{1D8C}', 'y'),  // LATIN SMALL LETTER V WITH PALATAL HOOK
    ('\u{1E9D}', 'f'),  // LATIN SMALL LETTER LONG S WITH HIGH STROKE
    ('\u{1EFF}', 'y'),  // LATIN SMALL LETTER Y WITH LOOP
    ('\u{2C66}', 't'),  // LATIN SMALL LETTER T WITH DIAGONAL STROKE
    ('\u{2C68}', 'h'),  // LATIN SMALL LETTER H WITH DESCENDER
    ('\u{2C6A}', 'k'),  // LATIN SMALL LETTER K WITH DESCENDER
    ('\u{2C6C}', 'z'),  // LATIN SMALL LETTER Z WITH DESCENDER
    ('\u{2C83}', 'b'),  // COPTIC SMALL LETTER VIDA
    ('\u{2C85}', 'r'),  // COPTIC SMALL LETTER GAMMA
    ('\u{2C8D}', 'z'),  // COPTIC SMALL LETTER ZATA
    ('\u{2C8F}', 'h'),  // COPTIC SMALL LETTER HATE
    ('\u{2C91}', 'o'),  // COPTIC SMALL LETTER THETHE
    ('\u{2C93}', 'i'),  // COPTIC SMALL LETTER IAUDA
    ('\u{2C95}', 'k'),  // COPTIC SMALL LETTER KAPA
    ('\u{2C99}', 'm'),  // COPTIC SMALL LETTER MI
    ('\u{2C9B}', 'n'),  // COPTIC SMALL LETTER NI
    ('\u{2C9F}', 'o'),  // COPTIC SMALL LETTER O
    ('\u{2CA3}', 'p'),  // COPTIC SMALL LETTER RO
    ('\u{2CA5}', 'c'),  // COPTIC SMALL LETTER SIMA
    ('\u{2CA7}', 't'),  // COPTIC SMALL LETTER TAU
    ('\u{2CA9}', 'y'),  // COPTIC SMALL LETTER UA
    ('\u{2CAD}', 'x'),  // COPTIC SMALL LETTER KHI
    ('\u{2CBD}', 'w'),  // COPTIC SMALL LETTER CRYPTOGRAMMIC NI
    ('\u{2CCF}', 'p'),  // COPTIC SMALL LETTER OLD COPTIC HA
    ('\u{2CD1}', 'l'),  // COPTIC SMALL LETTER L-SHAPED HA
    ('\u{2D19}', 'h'),  // GEORGIAN SMALL LETTER CHIN
    ('\u{2D1D}', 's'),  // GEORGIAN SMALL LETTER CHAR
    ('\u{2D2D}', 'z'),  // GEORGIAN SMALL LETTER AEN
    ('\u{2D31}', 'o'),  // TIFINAGH LETTER YAB
    ('\u{2D38}', 'v'),  // TIFINAGH LETTER YADH
    ('\u{2D39}', 'e'),  // TIFINAGH LETTER YADD
    ('\u{2D41}', 'o'),  // TIFINAGH LETTER BERBER ACADEMY YAH
    ('\u{2D4A}', 'l'),  // TIFINAGH LETTER YAZH
    ('\u{2D4F}', 'l'),  // TIFINAGH LETTER YAN
    ('\u{2D54}', 'o'),  // TIFINAGH LETTER YAR
    ('\u{2D55}', 'q'),  // TIFINAGH LETTER YARR
    ('\u{2D5D}', 'x'),  // TIFINAGH LETTER YATH
    ('\u{3112}', 't'),  // BOPOMOFO LETTER X
    ('\u{311A}', 'y'),  // BOPOMOFO LETTER A
    ('\u{4E05}', 't'),  // CJK UNIFIED IDEOGRAPH-4E05
    ('\u{4E2B}', 'y'),  // CJK UNIFIED IDEOGRAPH-4E2B
    ('\u{A4D0}', 'b'),  // LISU LETTER BA
    ('\u{A4D1}', 'p'),  // LISU LETTER PA
    ('\u{A4D2}', 'd'),  // LISU LETTER PHA
    ('\u{A4D3}', 'd'),  // LISU LETTER DA
    ('\u{A4D4}', 't'),  // LISU LETTER TA
    ('\u{A4D6}', 'g'),  // LISU LETTER GA
    ('\u{A4D7}', 'k'),  // LISU LETTER KA
    ('\u{A4D9}', 'j'),  // LISU LETTER JA
    ('\u{A4DA}', 'c'),  // LISU LETTER CA
    ('\u{A4DC}', 'z'),  // LISU LETTER DZA
    ('\u{A4DD}', 'f'),  // LISU LETTER TSA
    ('\u{A4DF}', 'm'),  // LISU LETTER MA
    ('\u{A4E0}', 'n'),  // LISU LETTER NA
    ('\u{A4E1}', 'l'),  // LISU LETTER LA
    ('\u{A4E2}', 's'),  // LISU LETTER SA
    ('\u{A4E3}', 'r'),  // LISU LETTER ZHA
    ('\u{A4E6}', 'v'),  // LISU LETTER HA
    ('\u{A4E7}', 'h'),  // LISU LETTER XA
    ('\u{A4EA}', 'w'),  // LISU LETTER WA
    ('\u{A4EB}', 'x'),  // LISU LETTER SHA
    ('\u{A4EC}', 'y'),  // LISU LETTER YA
    ('\u{A4EE}', 'a'),  // LISU LETTER A
    ('\u{A4F0}', 'e'),  // LISU LETTER E
    ('\u{A4F2}', 'l'),  // LISU LETTER I
    ('\u{A4F3}', 'o'),  // LISU LETTER O
    ('\u{A4F4}', 'u'),  // LISU LETTER U
    ('\u{A50B}', 't'),  // VAI SYLLABLE GBEE
    ('\u{A557}', 'b'),  // VAI SYLLABLE GBA
    ('\u{A56F}', 'l'),  // VAI SYLLABLE NA
    ('\u{A576}', 's'),  // VAI SYLLABLE POO
    ('\u{A5CB}', 'e'),  // VAI SYLLABLE TO
    ('\u{A647}', 'i'),  // CYRILLIC SMALL LETTER IOTA
    ('\u{A68D}', 't'),  // CYRILLIC SMALL LETTER TWE
    ('\u{A695}', 'h'),  // CYRILLIC SMALL LETTER HWE
    ('\u{A6A2}', 'o'),  // BAMUM LETTER U
    ('\u{A6B2}', 'y'),  // BAMUM LETTER NJAEM
    ('\u{A6C9}', 'z'),  // BAMUM LETTER WUE
    ('\u{A6DF}', 'v'),  // BAMUM LETTER KO
    ('\u{A731}', 's'),  // LATIN LETTER SMALL CAPITAL S
    ('\u{A741}', 'k'),  // LATIN SMALL LETTER K WITH STROKE
    ('\u{A74B}', 'o'),  // LATIN SMALL LETTER O WITH LONG STROKE OVERLAY
    ('\u{A761}', 'w'),  // LATIN SMALL LETTER VY
    ('\u{A781}', 'l'),  // LATIN SMALL LETTER TURNED L
    ('\u{A799}', 'f'),  // LATIN SMALL LETTER F WITH STROKE
    ('\u{A79F}', 'u'),  // LATIN SMALL LETTER VOLAPUK UE
    ('\u{A7B5}', 'b'),  // LATIN SMALL LETTER BETA
    ('\u{A7FA}', 'w'),  // LATIN LETTER SMALL CAPITAL TURNED M
    ('\u{A7FE}', 'l'),  // LATIN EPIGRAPHIC LETTER I LONGA
    ('\u{AB32}', 'e'),  // LATIN SMALL LETTER BLACKLETTER E
    ('\u{AB35}', 'f'),  // LATIN SMALL LETTER LENIS F
    ('\u{AB3D}', 'o'),  // LATIN SMALL LETTER BLACKLETTER O
    ('\u{AB3E}', 'o'),  // LATIN SMALL LETTER BLACKLETTER O WITH STROKE
    ('\u{AB47}', 'r'),  // LATIN SMALL LETTER R WITHOUT HANDLE
    ('\u{AB48}', 'r'),  // LATIN SMALL LETTER DOUBLE R
    ('\u{AB4E}', 'u'),  // LATIN SMALL LETTER U WITH SHORT RIGHT LEG
    ('\u{AB52}', 'u'),  // LATIN SMALL LETTER U WITH LEFT HOOK
    ('\u{AB53}', 'x'),  // LATIN SMALL LETTER CHI
    ('\u{AB5A}', 'y'),  // LATIN SMALL LETTER Y WITH SHORT RIGHT LEG
    ('\u{AB64}', 'a'),  // LATIN SMALL LETTER INVERTED ALPHA
    ('\u{AB70}', 'd'),  // CHEROKEE SMALL LETTER A
    ('\u{AB71}', 'r'),  // CHEROKEE SMALL LETTER E
    ('\u{AB72}', 't'),  // CHEROKEE SMALL LETTER I
    ('\u{AB74}', 'o'),  // CHEROKEE SMALL LETTER U
    ('\u{AB75}', 'i'),  // CHEROKEE SMALL LETTER V
    ('\u{AB79}', 'y'),  // CHEROKEE SMALL LETTER GI
    ('\u{AB7A}', 'a'),  // CHEROKEE SMALL LETTER GO
    ('\u{AB7B}', 'j'),  // CHEROKEE SMALL LETTER GU
    ('\u{AB7C}', 'e'),  // CHEROKEE SMALL LETTER GV
    ('\u{AB81}', 'r'),  // CHEROKEE SMALL LETTER HU
    ('\u{AB83}', 'w'),  // CHEROKEE SMALL LETTER LA
    ('\u{AB87}', 'm'),  // CHEROKEE SMALL LETTER LU
    ('\u{AB8B}', 'h'),  // CHEROKEE SMALL LETTER MI
    ('\u{AB8D}', 'y'),  // CHEROKEE SMALL LETTER MU
    ('\u{AB8E}', 'o'),  // CHEROKEE SMALL LETTER NA
    ('\u{AB8F}', 't'),  // CHEROKEE SMALL LETTER HNA
    ('\u{AB90}', 'g'),  // CHEROKEE SMALL LETTER NAH
    ('\u{AB92}', 'h'),  // CHEROKEE SMALL LETTER NI
    ('\u{AB93}', 'z'),  // CHEROKEE SMALL LETTER NO
    ('\u{AB9C}', 'u'),  // CHEROKEE SMALL LETTER SA
    ('\u{AB9F}', 'b'),  // CHEROKEE SMALL LETTER SI
    ('\u{ABA2}', 'r'),  // CHEROKEE SMALL LETTER SV
    ('\u{ABA4}', 'w'),  // CHEROKEE SMALL LETTER TA
    ('\u{ABA5}', 's'),  // CHEROKEE SMALL LETTER DE
    ('\u{ABA9}', 'v'),  // CHEROKEE SMALL LETTER DO
    ('\u{ABAA}', 's'),  // CHEROKEE SMALL LETTER DU
    ('\u{ABAE}', 'l'),  // CHEROKEE SMALL LETTER TLE
    ('\u{ABAF}', 'c'),  // CHEROKEE SMALL LETTER TLI
    ('\u{ABB2}', 'p'),  // CHEROKEE SMALL LETTER TLV
    ('\u{ABB6}', 'k'),  // CHEROKEE SMALL LETTER TSO
    ('\u{ABB7}', 'd'),  // CHEROKEE SMALL LETTER TSU
    ('\u{ABBB}', 'o'),  // CHEROKEE SMALL LETTER WI
    ('\u{10282}', 'b'), // LYCIAN LETTER B
    ('\u{10286}', 'e'), // LYCIAN LETTER I
    ('\u{10287}', 'f'), // LYCIAN LETTER W
    ('\u{1028A}', 'l'), // LYCIAN LETTER J
    ('\u{10290}', 'x'), // LYCIAN LETTER MM
    ('\u{10292}', 'o'), // LYCIAN LETTER U
    ('\u{10295}', 'p'), // LYCIAN LETTER R
    ('\u{10296}', 's'), // LYCIAN LETTER S
    ('\u{10297}', 't'), // LYCIAN LETTER T
    ('\u{102A0}', 'a'), // CARIAN LETTER A
    ('\u{102A1}', 'b'), // CARIAN LETTER P2
    ('\u{102A2}', 'c'), // CARIAN LETTER D
    ('\u{102A5}', 'f'), // CARIAN LETTER R
    ('\u{102AB}', 'o'), // CARIAN LETTER O
    ('\u{102B0}', 'm'), // CARIAN LETTER S
    ('\u{102B1}', 't'), // CARIAN LETTER C-18
    ('\u{102B2}', 'y'), // CARIAN LETTER U
    ('\u{102B4}', 'x'), // CARIAN LETTER X
    ('\u{102CF}', 'h'), // CARIAN LETTER E2
    ('\u{10301}', 'b'), // OLD ITALIC LETTER BE
    ('\u{10302}', 'c'), // OLD ITALIC LETTER KE
    ('\u{10309}', 'l'), // OLD ITALIC LETTER I
    ('\u{1030F}', 'o'), // OLD ITALIC LETTER O
    ('\u{10311}', 'm'), // OLD ITALIC LETTER SHE
    ('\u{10315}', 't'), // OLD ITALIC LETTER TE
    ('\u{10317}', 'x'), // OLD ITALIC LETTER EKS
    ('\u{1031C}', 'b'), // OLD ITALIC LETTER CHE
    ('\u{1042C}', 'o'), // DESERET SMALL LETTER LONG O
    ('\u{1043D}', 'c'), // DESERET SMALL LETTER CHEE
    ('\u{10443}', 'l'), // DESERET SMALL LETTER ETH
    ('\u{10448}', 's'), // DESERET SMALL LETTER ZHEE
    ('\u{104DC}', 'r'), // OSAGE SMALL LETTER BRA
    ('\u{104EA}', 'o'), // OSAGE SMALL LETTER O
    ('\u{104F6}', 'u'), // OSAGE SMALL LETTER U
    ('\u{10507}', 'z'), // ELBASAN LETTER EI
    ('\u{1050E}', 'l'), // ELBASAN LETTER JE
    ('\u{10513}', 'n'), // ELBASAN LETTER NE
    ('\u{10516}', 'o'), // ELBASAN LETTER O
    ('\u{10518}', 'k'), // ELBASAN LETTER QE
    ('\u{1051B}', 'c'), // ELBASAN LETTER SE
    ('\u{1051D}', 'v'), // ELBASAN LETTER TE
    ('\u{1051E}', 'o'), // ELBASAN LETTER THE
    ('\u{10525}', 'f'), // ELBASAN LETTER GHE
    ('\u{10526}', 'l'), // ELBASAN LETTER GHAMMA
    ('\u{10527}', 'x'), // ELBASAN LETTER KHE
    ('\u{10926}', 'l'), // LYDIAN LETTER I
    ('\u{1092C}', 'o'), // LYDIAN LETTER O
    ('\u{10C13}', 'x'), // OLD TURKIC LETTER ORKHON AED
    ('\u{10C17}', 'o'), // OLD TURKIC LETTER YENISEI AY
    ('\u{10C1F}', 'v'), // OLD TURKIC LETTER YENISEI AL
    ('\u{10C20}', 'y'), // OLD TURKIC LETTER ORKHON AEL
    ('\u{10C21}', 'm'), // OLD TURKIC LETTER ORKHON ELT
    ('\u{10C3E}', 'l'), // OLD TURKIC LETTER ORKHON AES
    ('\u{10CC2}', 'x'), // OLD HUNGARIAN SMALL LETTER EB
    ('\u{10D07}', 'o'), // HANIFI ROHINGYA LETTER HA
    ('\u{11116}', 'o'), // CHAKMA LETTER TAA
    ('\u{11124}', 'o'), // CHAKMA LETTER WAA
    ('\u{114C5}', 'w'), // TIRHUTA GVANG
    ('\u{11706}', 'v'), // AHOM LETTER PA
    ('\u{1170A}', 'w'), // AHOM LETTER JA
    ('\u{1170E}', 'w'), // AHOM LETTER LA
    ('\u{1170F}', 'w'), // AHOM LETTER SA
    ('\u{118C0}', 'v'), // WARANG CITI SMALL LETTER NGAA
    ('\u{118C1}', 's'), // WARANG CITI SMALL LETTER A
    ('\u{118C2}', 'f'), // WARANG CITI SMALL LETTER WI
    ('\u{118C3}', 'i'), // WARANG CITI SMALL LETTER YU
    ('\u{118C4}', 'y'), // WARANG CITI SMALL LETTER YA
    ('\u{118C6}', 'e'), // WARANG CITI SMALL LETTER II
    ('\u{118C8}', 'o'), // WARANG CITI SMALL LETTER E
    ('\u{118C9}', 'z'), // WARANG CITI SMALL LETTER O
    ('\u{118CE}', 'e'), // WARANG CITI SMALL LETTER YUJ
    ('\u{118D2}', 'l'), // WARANG CITI SMALL LETTER TTE
    ('\u{118D5}', 'o'), // WARANG CITI SMALL LETTER AT
    ('\u{118D7}', 'o'), // WARANG CITI SMALL LETTER BU
    ('\u{118D8}', 'u'), // WARANG CITI SMALL LETTER PU
    ('\u{118DC}', 'y'), // WARANG CITI SMALL LETTER HAR
    ('\u{11ABC}', 'z'), // CANADIAN SYLLABICS SPE
    ('\u{11ABE}', 'n'), // CANADIAN SYLLABICS SPO
    ('\u{1699B}', 'o'), // BAMUM LETTER PHASE-E SUAEN
    ('\u{16A19}', 'r'), // BAMUM LETTER PHASE-F NU
    ('\u{16AD6}', 's'), // BASSA VAH LETTER GAH
    ('\u{16AE4}', 'l'), // BASSA VAH LETTER YEIN
    ('\u{16AE9}', 'o'), // BASSA VAH LETTER OO
    ('\u{16F08}', 'v'), // MIAO LETTER VA
    ('\u{16F0A}', 't'), // MIAO LETTER TA
    ('\u{16F16}', 'l'), // MIAO LETTER LA
    ('\u{16F28}', 'l'), // MIAO LETTER GHA
    ('\u{16F35}', 'r'), // MIAO LETTER ZHA
    ('\u{16F3A}', 's'), // MIAO LETTER SA
    ('\u{16F40}', 'a'), // MIAO LETTER ZZYA
    ('\u{16F42}', 'u'), // MIAO LETTER WA
    ('\u{16F43}', 'y'), // MIAO LETTER AH
];

/// The homoglyphs above that confusables.txt maps to `l` exactly, which is
/// its prototype of both `l` and `I` (and `1`, `|`): after lower-casing,
/// `Ӏgnore` (Cyrillic palochka) reads `ӏgnore`, an `i`, where `aӏl` is an
/// `l`. The table says `l`; the detector also tries `i` for these. Sorted.
pub(crate) const I_OR_L: &[char] = &[
    '\u{01C0}',  // LATIN LETTER DENTAL CLICK
    '\u{04CF}',  // CYRILLIC SMALL LETTER PALOCHKA
    '\u{05D5}',  // HEBREW LETTER VAV
    '\u{05DF}',  // HEBREW LETTER FINAL NUN
    '\u{0627}',  // ARABIC LETTER ALEF
    '\u{07CA}',  // NKO LETTER A
    '\u{16C1}',  // RUNIC LETTER ISAZ IS ISS I
    '\u{16D0}',  // RUNIC LETTER SHORT-TWIG-TYR T
    '\u{2D4A}',  // TIFINAGH LETTER YAZH
    '\u{2D4F}',  // TIFINAGH LETTER YAN
    '\u{A4F2}',  // LISU LETTER I
    '\u{A56F}',  // VAI SYLLABLE NA
    '\u{A781}',  // LATIN SMALL LETTER TURNED L
    '\u{A7FE}',  // LATIN EPIGRAPHIC LETTER I LONGA
    '\u{1028A}', // LYCIAN LETTER J
    '\u{10309}', // OLD ITALIC LETTER I
    '\u{1050E}', // ELBASAN LETTER JE
    '\u{10926}', // LYDIAN LETTER I
    '\u{10C3E}', // OLD TURKIC LETTER ORKHON AES
    '\u{16F28}', // MIAO LETTER GHA
];
