// OHIF Viewer's app-config.js (npm @ohif/app, its prebuilt dist) for the Orthanc of Vesalius: the
// viewer of docker/compose.yaml (docker/Dockerfile.ohif) and of the real-browser test
// (tests/ohif_peer.py) both serve this file. The secure default of dist/app-config.js with one data
// source: Orthanc's DICOMweb on the viewer's own origin ("/dicom-web", forwarded to Orthanc's
// DicomWeb.Root by the server in front: docker/ohif/nginx.conf, or the tests' server).
window.config = {
  routerBasename: null,
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {
      friendlyName: 'Orthanc',
      name: 'orthanc',
      wadoUriRoot: '/dicom-web',
      qidoRoot: '/dicom-web',
      wadoRoot: '/dicom-web',
      qidoSupportsIncludeField: false,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      omitQuotationForMultipartRequest: true,
      bulkDataURI: { enabled: true },
    },
  }],
};
