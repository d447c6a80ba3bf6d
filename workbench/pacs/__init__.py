"""The PACS: pulling studies over DICOMweb and sending results back."""
