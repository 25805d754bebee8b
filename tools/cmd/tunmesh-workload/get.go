package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// runGet sends cfg.count GET requests (forever when 0), printing each
// response body to stdout.
//
// Exit code: with --count N it is 0 only if all N requests completed with
// the expected status; being signalled before the last one is a failure.
// With --count 0 the workload runs until signalled, logging failures, and
// then exits 0.
func runGet(ctx context.Context, cfg getConfig, e *env) int {
	client := &http.Client{
		Transport: &http.Transport{
			Proxy:               nil, // never route cluster traffic via an environment proxy
			DialContext:         (&net.Dialer{Timeout: cfg.timeout}).DialContext,
			DisableKeepAlives:   true, // a fresh connection per request exercises service routing every time
			TLSHandshakeTimeout: cfg.timeout,
		},
	}
	defer client.CloseIdleConnections()

	log := e.log.With("url", cfg.url)
	var ok, failed int
	for i := 0; cfg.count == 0 || i < cfg.count; i++ {
		if i > 0 && cfg.interval > 0 && !sleepCtx(ctx, cfg.interval) {
			break
		}
		if ctx.Err() != nil {
			break
		}
		err := getOnce(ctx, client, cfg, e)
		if err != nil && ctx.Err() != nil {
			break // interrupted mid-request: neither success nor failure
		}
		if err != nil {
			failed++
			log.Warn("request failed", "seq", i+1, "error", err)
		} else {
			ok++
		}
	}

	log.Info("done", "requests", ok+failed, "ok", ok, "failed", failed)
	switch {
	case cfg.count == 0:
		return exitOK
	case ok+failed < cfg.count:
		log.Error("interrupted before all requests were sent", "count", cfg.count)
		return exitFail
	case failed > 0:
		return exitFail
	}
	return exitOK
}

// getOnce performs one request, copies the body to stdout and returns an
// error if the request failed or the status was unexpected.
func getOnce(ctx context.Context, client *http.Client, cfg getConfig, e *env) error {
	ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, cfg.url, nil)
	if err != nil {
		return err
	}
	req.Header.Set("User-Agent", progName)
	start := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return fmt.Errorf("timed out after %v: %w", cfg.timeout, err)
		}
		return err
	}
	defer resp.Body.Close()
	n, err := io.Copy(e.stdout, resp.Body)
	if err != nil {
		return fmt.Errorf("reading body after %d bytes: %w", n, err)
	}
	e.log.Info("response", "url", cfg.url, "status", resp.StatusCode, "bytes", n, "duration", time.Since(start))
	if resp.StatusCode != cfg.expectStatus {
		return fmt.Errorf("got status %d, want %d", resp.StatusCode, cfg.expectStatus)
	}
	return nil
}

// normalizeURL accepts an http(s) URL, adding "http://" when the scheme is
// missing ("web:8080/healthz").
func normalizeURL(raw string) (string, error) {
	s := raw
	if !strings.Contains(s, "://") {
		s = "http://" + s
	}
	u, err := url.Parse(s)
	if err != nil {
		return "", fmt.Errorf("invalid URL %q: %w", raw, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return "", fmt.Errorf("invalid URL %q: scheme must be http or https", raw)
	}
	if u.Host == "" {
		return "", fmt.Errorf("invalid URL %q: missing host", raw)
	}
	return u.String(), nil
}
