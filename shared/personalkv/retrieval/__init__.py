"""Encoders and the retriever that ranks a user's concepts for a question.

  encoders   TextEncoder / ImageEncoder interfaces, MiniLM (offline) and a weights-free
             image descriptor, chosen by name (``get_text_encoder`` / ``get_image_encoder``)
  keys       how a concept manifest becomes index entries (``KeyBuilder``)
  retriever  ``Retriever.retrieve`` -> ``RetrievalResult`` (ranked concepts + chunks to place)
"""
