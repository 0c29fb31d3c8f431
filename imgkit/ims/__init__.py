"""What IMS asks of a file, and the tools that get a disk there.

rules.py     the reference's rules as data (paths, limits, error codes, os_version table)
partitions   MBR/GPT, enough to tell a bootable system disk and its boot mode
bitmap.py    the .mf bitmap of a RAW quick import
validate.py  findings (code, severity, message, fix) for a file and its request
prepare.py   any disk -> a registration-ready folder (image, bitmap, request, manifest)
"""
