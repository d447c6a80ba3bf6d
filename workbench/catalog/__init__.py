"""The catalog: ingest (folders and PACS pulls into records), the decoded-pixel cache, cohorts,
subgroups and plain records."""
