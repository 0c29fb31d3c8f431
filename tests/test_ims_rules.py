"""Every field and size rule of shared/reference/ims-rules.md: one case that breaks it, one that keeps it.

These call the checks directly with declared sizes (no files), so boundaries like 1 TB cost nothing;
test_ims_validate.py runs the same rules through the CLI on real (sparse) files.
"""
from __future__ import annotations

import pytest

from imgkit.ims import rules
from imgkit.ims.validate import (Request, check_description, check_file, check_image_url, check_min_disk,
                                 check_min_disk_range, check_name, check_request, check_tags, needed_gb,
                                 parse_tag, smallest_min_disk, suggest_os_versions)

GB = 1 << 30
TB = 1 << 40
OS = "Ubuntu 18.04 server 64bit"


def codes(findings, severity=None):
    return [f.code for f in findings if severity is None or f.severity == severity]


def errors(findings):
    return codes(findings, "error")


# ------------------------------------------------------------------ name (9.1)

@pytest.mark.parametrize("name", ["a", "x" * 128, "Web server 01", "ubuntu-18.04_base", "镜像-01"])
def test_valid_names(name):
    assert check_name(name) == []


def test_name_of_129_characters_is_img_0002():
    assert errors(check_name("x" * 129)) == ["IMG.0002"]


def test_empty_name_is_img_0013():
    assert errors(check_name("")) == ["IMG.0013"]


@pytest.mark.parametrize("name", ["web/server", "a*b", "tab\there", "quote'"])
def test_name_with_bad_characters_is_img_0003(name):
    assert errors(check_name(name)) == ["IMG.0003"]


@pytest.mark.parametrize("name", [" lead", "trail "])
def test_name_with_outer_space_is_img_0062(name):
    assert errors(check_name(name)) == ["IMG.0062"]


def test_register_path_allows_255_character_names():
    register = Request(method="register", name="x" * 255, os_version=OS)
    assert errors(check_request(register)) == []
    assert errors(check_request(Request(method="register", name="x" * 256, os_version=OS))) == ["IMG.0002"]
    assert errors(check_request(Request(method="file", name="x" * 255, os_version=OS))) == ["IMG.0002"]


# ------------------------------------------------------------------ description (9.1)

def test_description_of_1024_characters_is_valid():
    assert check_description("d" * 1024) == []
    assert check_description("Built by CI, 2026-12-03.") == []


def test_description_of_1025_characters_is_img_0004():
    assert errors(check_description("d" * 1025)) == ["IMG.0004"]


@pytest.mark.parametrize("text", ["a <b>", "line\rbreak", "line\nbreak"])
def test_description_with_angle_brackets_or_line_breaks_is_img_0054(text):
    assert errors(check_description(text)) == ["IMG.0054"]


# ------------------------------------------------------------------ tags and image_tags (9.2)

def test_tag_is_split_at_the_first_dot():
    assert parse_tag("key.value.with.dots") == ("key", "value.with.dots")
    assert parse_tag("lonely") == ("lonely", "")


@pytest.mark.parametrize("tag", ["k" * 36 + ".v", "key." + "v" * 43, "key", "key.", "a-b_c.1.2-x_y"])
def test_valid_tags(tag):
    assert check_tags([tag], []) == []


@pytest.mark.parametrize("tag", ["k" * 37 + ".v", "key." + "v" * 44, ".value", "ke y.v", "key.v/w", "ключ.v"])
def test_invalid_tags_are_img_0115(tag):
    assert set(errors(check_tags([tag], []))) == {"IMG.0115"}


def test_image_tags_follow_the_same_rules():
    assert check_tags([], ["k" * 36 + "=" + "v" * 43]) == []
    assert set(errors(check_tags([], ["k" * 37 + "=v"]))) == {"IMG.0115"}
    assert set(errors(check_tags([], ["k=" + "v" * 44]))) == {"IMG.0115"}


def test_duplicate_tag_keys_are_img_0115():
    assert errors(check_tags(["env.prod", "env.test"], [])) == ["IMG.0115"]
    assert check_tags(["env.prod", "team.db"], []) == []


def test_tags_and_image_tags_together_are_refused():
    assert "IMGKIT.TAGS_BOTH" in errors(check_tags(["a.b"], ["c=d"]))


def test_native_metadata_tags_forbid_equals_sign():
    assert errors(check_tags(["a=b"], [], native=True)) == ["IMG.0115", "IMG.0115"]
    assert check_tags(["a.b"], [], native=True) == []


# ------------------------------------------------------------------ os_version, os_type (9.5, 5.1.x)

def test_os_version_table_matches_the_reference():
    assert len(rules.ALL_OS_VERSIONS) == 131
    for value in ("Windows Server 2019 Datacenter 64bit", "SUSE Linux Enterprise Server 11 SP3 32bit",
                  "Oracle Linux Server release 6.10 64bit", "Redhat Linux Enterprise 6.4 32bit",
                  "Ubuntu 14.04 server 32bit", "openSUSE 11.3 64bit", "CentOS 6.3 32bit",
                  "Debian GNU/Linux 8.1.0 64bit", "Fedora 22 64bit", "EulerOS 2.1 64bit",
                  "openEuler 20.03 64bit", "NeoKylin Linux Advanced Server release 7.0 U5 64bit"):
        assert value in rules.ALL_OS_VERSIONS


def test_valid_os_version_has_no_finding():
    assert check_request(Request(method="quick", os_version=OS)) == []


def test_os_version_typo_suggests_the_nearest_values():
    found = check_request(Request(method="quick", os_version="Ubuntu 18.04 server 64 bit"))
    assert errors(found) == ["IMGKIT.OS_VERSION"]
    assert OS in found[0].fix
    assert suggest_os_versions("centos 7.6 64bit")[0] == "CentOS 7.6 64bit"


def test_os_version_is_required_for_quick_import_of_a_system_disk():
    assert errors(check_request(Request(method="quick", disk="system"))) == ["IMG.0159"]
    assert check_request(Request(method="quick", disk="data")) == []


def test_missing_os_version_on_other_system_paths_is_a_warning():
    found = check_request(Request(method="file"))
    assert codes(found, "warning") == ["IMGKIT.OS_VERSION_MISSING"] and errors(found) == []


@pytest.mark.parametrize("os_type,disk,ok", [("Linux", "system", True), ("Windows", "system", True),
                                             ("Other", "system", True), ("Other", "data", False),
                                             ("Linux", "data", True), ("BeOS", "system", False)])
def test_os_type_values(os_type, disk, ok):
    method = "data" if disk == "data" else "file"
    found = errors(check_request(Request(method=method, disk=disk, os_type=os_type)))
    assert found == ([] if ok else ["IMG.0056"])


def test_os_type_contradicting_os_version_is_img_0122():
    assert errors(check_request(Request(os_type="Windows", os_version=OS))) == ["IMG.0122"]
    assert errors(check_request(Request(os_type="Windows", os_version="Windows 10 64bit"))) == []


# ------------------------------------------------------------------ architecture and firmware (5.1.4, 9.1)

def test_arm_needs_uefi():
    assert errors(check_request(Request(method="quick", os_version=OS, architecture="arm",
                                        firmware="bios"))) == ["IMGKIT.ARM_UEFI"]
    assert errors(check_request(Request(method="quick", os_version=OS, architecture="arm",
                                        firmware="uefi"))) == []


def test_firmware_must_be_bios_or_uefi():
    assert errors(check_request(Request(os_version=OS, firmware="coreboot"))) == ["IMG.0141"]


# ------------------------------------------------------------------ image_url (5.1.x, IMG.0175, IMG.0075)

@pytest.mark.parametrize("url", ["my-bucket:disk.raw", "ims.images:folder/sub/disk-01.qcow2"])
def test_valid_image_urls(url):
    assert check_image_url(url) == []


@pytest.mark.parametrize("url,code", [("disk.raw", "IMGKIT.IMAGE_URL"), ("bucket:", "IMGKIT.IMAGE_URL"),
                                      ("bucket:my folder/disk.raw", "IMG.0175"),
                                      ("bucket:disk 01.raw", "IMG.0175"),
                                      ("bucket:disk#1.raw", "IMG.0075"),
                                      ("bucket:" + "d" * 129, "IMG.0075"),
                                      ("My_Bucket:disk.raw", "IMG.0109")])
def test_invalid_image_urls(url, code):
    assert code in errors(check_image_url(url))


# ------------------------------------------------------------------ min_disk (5.1.3, 5.1.4, 5.1.5, 6.1.6)

MIN_DISK_VALUES = (0, 1, 40, 255, 1024, 1025, 2048, 2049)
VALID_MIN_DISK = {   # written out by hand from the reference, not derived from rules.py
    ("quick", "system"): {1, 40, 255, 1024},
    ("quick", "data"): {1, 40, 255, 1024},
    ("file", "system"): {40, 255},
    ("file", "data"): {1, 40, 255, 1024, 1025, 2048},
    ("data", "data"): {40, 255, 1024, 1025, 2048},
    ("register", "system"): {40, 255},
}


@pytest.mark.parametrize("key", sorted(VALID_MIN_DISK))
@pytest.mark.parametrize("value", MIN_DISK_VALUES)
def test_min_disk_boundaries(key, value):
    found = errors(check_min_disk_range(value, rules.path_for(*key)))
    assert found == ([] if value in VALID_MIN_DISK[key] else ["IMG.0055"])


def test_min_disk_must_hold_the_virtual_disk():
    path = rules.path_for("file", "system")
    assert needed_gb(40 * GB) == 40 and needed_gb(40 * GB + 1) == 41 and needed_gb(1) == 1
    assert errors(check_min_disk(path, 40 * GB, 40)[0]) == []
    assert errors(check_min_disk(path, 40 * GB + 1, 40)[0]) == ["IMG.0055"]


def test_min_disk_is_computed_when_not_given():
    assert smallest_min_disk(rules.path_for("quick", "system"), 10 << 20) == 1
    assert smallest_min_disk(rules.path_for("file", "system"), 10 << 20) == 40
    assert smallest_min_disk(rules.path_for("file", "system"), 100 * GB + 5) == 101
    found, facts = check_min_disk(rules.path_for("data", "data"), 3 * GB, None)
    assert found == [] and facts["min-disk"] == 40 and facts["min-disk-computed"]


@pytest.mark.parametrize("key,size,code", [(("file", "system"), 255 * GB + 1, "IMG.0111"),
                                           (("quick", "system"), 1024 * GB + 1, "IMG.0111"),
                                           (("data", "data"), 2048 * GB + 1, "IMG.0055")])
def test_disk_too_large_for_the_path(key, size, code):
    found, facts = check_min_disk(rules.path_for(*key), size, None)
    assert errors(found) == [code] and facts["min-disk"] is None
    assert check_min_disk(rules.path_for(*key), size - 1, None)[0] == []


# ------------------------------------------------------------------ format and file size (5.1.3-5.1.7)

@pytest.mark.parametrize("method,fmt,code", [("quick", "qcow2", "IMG.0158"), ("quick", "vmdk", "IMG.0158"),
                                             ("file", "luks", "IMG.0072"), ("register", "dmg", "IMG.0072")])
def test_format_refused_on_the_path(method, fmt, code):
    found, _ = check_file(rules.path_for(method, "system"), fmt, 1 << 20, 1 << 20, None)
    assert errors(found) == [code]


@pytest.mark.parametrize("method,fmt", [("quick", "raw"), ("quick", "zvhd2"), ("file", "qcow2"), ("file", "vmdk"),
                                        ("file", "vhd"), ("file", "vhdx"), ("register", "qcow2")])
def test_format_accepted_on_the_path(method, fmt):
    found, _ = check_file(rules.path_for(method, "system"), fmt, 1 << 20, 1 << 20, None)
    assert errors(found) == []


def test_register_path_warns_for_a_format_without_disk_format_value():
    found, _ = check_file(rules.path_for("register", "system"), "vmdk", 1 << 20, 1 << 20, None)
    assert codes(found) == ["IMGKIT.DISK_FORMAT"]


@pytest.mark.parametrize("method,limit", [("file", 128 * GB), ("register", 128 * GB), ("quick", TB)])
def test_file_size_limits(method, limit):
    path = rules.path_for(method, "system")
    fmt = "raw"
    assert errors(check_file(path, fmt, limit, None, None)[0]) == []
    assert errors(check_file(path, fmt, limit + 1, None, None)[0]) == ["IMG.0059"]


def test_files_of_128_gb_on_the_file_path_should_use_quick_import():
    found, _ = check_file(rules.path_for("file", "system"), "qcow2", 128 * GB, None, None)
    assert codes(found) == ["IMGKIT.QUICK_RECOMMENDED"]
    assert check_file(rules.path_for("file", "system"), "qcow2", 128 * GB - 1, None, None)[0] == []


def test_unknown_method_and_disk_pair_is_a_usage_error():
    from imgkit.errors import UsageError
    with pytest.raises(UsageError):
        check_request(Request(method="register", disk="data"))


def test_every_code_the_ims_modules_emit_is_documented():
    """ERROR_CODES and IMGKIT_CODES are the list the README points to: no code may be missing."""
    import re
    from pathlib import Path

    import imgkit.ims
    from imgkit.ims import rules
    source = "".join(p.read_text() for p in Path(imgkit.ims.__file__).parent.glob("*.py"))
    used = set(re.findall(r'"(IMG\.\d{4}|IMGKIT\.[A-Z_]+)"', source))
    documented = set(rules.ERROR_CODES) | set(rules.IMGKIT_CODES)
    assert used - documented == set()
