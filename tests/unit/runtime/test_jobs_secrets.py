"""Issue 11, defect 8: `zsad submit` never writes storage secrets into the job.yaml it ships; they
travel as the job's environment variables, where the run's storage settings find them."""

from pathlib import Path

from pipeline.config import load_spec
from pipeline.io.fs import storage_options
from pipeline.runtime.jobs import write_working_dir


def test_secrets_travel_as_environment_variables_not_in_the_shipped_file(tmp_path):
    spec = load_spec("jobs/smoke.yaml", ["storage.access_key_id=AKIDEXAMPLE", "storage.secret_access_key=s3cr3t-v4lue",
                                        "storage.endpoint_url=http://127.0.0.1:9000"])
    env = write_working_dir(str(tmp_path), spec, "r1", 1)
    text = (tmp_path / "job.yaml").read_text()
    assert "s3cr3t-v4lue" not in text and "AKIDEXAMPLE" not in text
    assert "http://127.0.0.1:9000" in text  # the rest of the storage section ships
    assert env == {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t-v4lue"}
    shipped = load_spec(tmp_path / "job.yaml")
    assert shipped.storage.secret_access_key is None
    opts = storage_options(shipped.storage, env={**env, "AWS_DEFAULT_REGION": "us-east-1"})  # what the job sees
    assert opts["key"] == "AKIDEXAMPLE" and opts["secret"] == "s3cr3t-v4lue"
    plain = load_spec("jobs/smoke.yaml")
    assert write_working_dir(str(tmp_path), plain, "r2", 1) == {}
    assert Path(tmp_path / "job.yaml").read_text().count("secret_access_key: null") == 1
