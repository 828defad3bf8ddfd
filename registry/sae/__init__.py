"""What an SAE is: config and module per architecture (:mod:`.modules`), the SAELens-layout
folder (:mod:`.folder`) and foreign layouts (:mod:`.formats`). Importing the package is light;
:mod:`.modules` imports torch."""
