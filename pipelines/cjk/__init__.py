"""A CJK character-recognition dataset rendered from the fonts installed on the machine.

The stages, each in its own module:

    charsets  the class sets: GB2312 level 1, the CJK Unified Ideographs block, or a file
    fonts     find font files and the faces inside them, including .ttc/.otc collections
    glyphs    check each face's character map and draw a probe of every glyph it covers
    holdout   group faces into designs and choose whole designs for val and test
    plan      decide which faces draw which character, how often and in which split
    render    draw one augmented sample of a glyph
    output    check the build folder and write list.csv, classes.txt, faces.csv and build.json
    options   the build options and summary
    build     run the stages, rendering in worker processes, and the command line

Run it with `python -m pipelines.cjk.build --help` from the repository root.
"""
