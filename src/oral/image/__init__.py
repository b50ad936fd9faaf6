"""The image domain: style sets (`data`), the text-to-image base model the style LoRAs adapt (`base`)."""
