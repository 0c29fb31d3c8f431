"""Enough of MBR and GPT to answer two questions: is the disk partitioned, and does it boot UEFI.

Read through Reader.readinto, so it works on any format the engine reads. Every count and
offset taken from the disk is bounded before it is used; a malformed table is reported as a
note, never as an exception.
"""
from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass, field

MBR_SIGNATURE = b"\x55\xaa"
MBR_PROTECTIVE = 0xEE
MBR_ESP = 0xEF
GPT_SIGNATURE = b"EFI PART"
GPT_SECTOR_SIZES = (512, 4096)
GPT_MAX_ENTRIES = 1024
GPT_MAX_ENTRY_SIZE = 1024
GPT_MIN_HEADER = 92
ESP_GUID = uuid.UUID("C12A7328-F81F-11D2-BA4B-00A0C93EC93B").bytes_le
BIOS_BOOT_GUID = uuid.UUID("21686148-6E69-6E65-6449-6F6E744E6565").bytes_le


@dataclass
class PartitionTable:
    kind: str | None = None            # "mbr", "gpt" or None (no partition table)
    sector_size: int = 512
    partitions: int = 0
    has_esp: bool = False               # an EFI system partition: the disk boots UEFI
    has_bios_boot: bool = False         # a GPT BIOS boot partition: it also boots BIOS
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"table": self.kind, "sector-size": self.sector_size, "partitions": self.partitions,
                "efi-system-partition": self.has_esp, "bios-boot-partition": self.has_bios_boot}


def _read(reader, offset: int, length: int) -> bytes | None:
    """length bytes of the virtual disk at offset, or None when that lies past its end."""
    if offset < 0 or offset + length > reader.virtual_size:
        return None
    buf = bytearray(length)
    reader.readinto(offset, memoryview(buf))
    return bytes(buf)


def read_partition_table(reader) -> PartitionTable:
    """The disk's partition table as far as booting is concerned."""
    mbr = _read(reader, 0, 512)
    if mbr is None or mbr[510:512] != MBR_SIGNATURE:
        return PartitionTable()
    entries = [mbr[446 + 16 * i: 462 + 16 * i] for i in range(4)]
    if any(e[0] not in (0x00, 0x80) for e in entries):
        return PartitionTable(notes=["sector 0 ends in 55AA but holds no valid MBR partition entries "
                                     "(a file system boot sector?)"])
    types = [e[4] for e in entries if e[4] != 0]
    if MBR_PROTECTIVE in types:
        gpt = _read_gpt(reader)
        if gpt is not None:
            return gpt
    table = PartitionTable("mbr", partitions=len(types), has_esp=MBR_ESP in types)
    if MBR_PROTECTIVE in types:
        table.notes.append("protective MBR, but no valid GPT header was found")
    return table


def _read_gpt(reader) -> PartitionTable | None:
    for sector in GPT_SECTOR_SIZES:
        header = _read(reader, sector, sector)
        if header is not None and header[:8] == GPT_SIGNATURE:
            return _parse_gpt(reader, header, sector)
    return None


def _parse_gpt(reader, header: bytes, sector: int) -> PartitionTable:
    table = PartitionTable("gpt", sector_size=sector)
    header_size, header_crc = struct.unpack_from("<II", header, 12)
    if not GPT_MIN_HEADER <= header_size <= sector:
        table.notes.append(f"GPT header size {header_size} is invalid")
        return table
    check = bytearray(header[:header_size])
    check[16:20] = bytes(4)
    if zlib.crc32(check) != header_crc:
        table.notes.append("GPT header checksum does not match")
    entries_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
    if count > GPT_MAX_ENTRIES or not 128 <= entry_size <= GPT_MAX_ENTRY_SIZE or entry_size % 8:
        table.notes.append(f"GPT declares {count} entries of {entry_size} bytes; not read")
        return table
    data = _read(reader, entries_lba * sector, count * entry_size) if entries_lba < (1 << 40) else None
    if data is None:
        table.notes.append("GPT partition entries lie outside the disk")
        return table
    for i in range(count):
        type_guid = data[i * entry_size: i * entry_size + 16]
        if type_guid == bytes(16):
            continue
        table.partitions += 1
        table.has_esp |= type_guid == ESP_GUID
        table.has_bios_boot |= type_guid == BIOS_BOOT_GUID
    return table
