package service

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tunmesh/tunmesh/identity/api"
	"github.com/tunmesh/tunmesh/identity/ca"
)

type metrics struct {
	gatherer      prometheus.Gatherer
	issued        prometheus.Counter
	refusals      *prometheus.CounterVec
	issuerExpiry  prometheus.Gauge
	issuerUpdates *prometheus.CounterVec
	watchErrors   *prometheus.CounterVec
	latency       prometheus.Histogram
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		issued: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tunmesh_identity_certificates_issued_total",
			Help: "Workload certificates issued.",
		}),
		refusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tunmesh_identity_refusals_total",
			Help: "Certify requests refused, by reason.",
		}, []string{"reason"}),
		issuerExpiry: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tunmesh_identity_issuer_expiry_timestamp_seconds",
			Help: "NotAfter of the issuer certificate in use, as a Unix timestamp.",
		}),
		issuerUpdates: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tunmesh_identity_issuer_updates_total",
			Help: "Issuer Secret changes seen, by result (updated, skipped).",
		}, []string{"result"}),
		watchErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tunmesh_identity_watch_errors_total",
			Help: "Watch failures (each is re-established), by resource.",
		}, []string{"resource"}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "tunmesh_identity_certify_duration_seconds",
			Help:    "Time to answer a Certify request.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
		}),
	}
	for _, c := range []prometheus.Collector{m.issued, m.refusals, m.issuerExpiry, m.issuerUpdates, m.watchErrors, m.latency} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register identity metrics: %w", err)
		}
	}
	// Refusal reasons exist from the start so dashboards see zeros.
	for _, c := range []api.Code{api.CodeBadRequest, api.CodeUnauthenticated, api.CodeNotAgent, api.CodeAgentPodUnknown,
		api.CodeIdentityNotOnNode, api.CodeBadCSR, api.CodeKeyAlgorithm, api.CodeSANMismatch, api.CodeUnavailable, api.CodeInternal} {
		m.refusals.WithLabelValues(string(c))
	}
	if g, ok := reg.(prometheus.Gatherer); ok {
		m.gatherer = g
	} else {
		m.gatherer = prometheus.DefaultGatherer
	}
	return m, nil
}

func (m *metrics) observeIssuer(iss *ca.Issuer) {
	m.issuerExpiry.Set(float64(iss.Certificate.NotAfter.Unix()))
}
