from cpa_fhir.cli import main

main()
