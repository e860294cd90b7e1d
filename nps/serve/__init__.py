"""The preference web app (`nps serve`): ``app`` its pages and routes, ``service`` what they do
(questions, answers, z, blind A/B, checks), ``store`` where answers live. The trained run it serves
is ``nps.steering_run.SteeringRun``, which the CLI and the workflows load too."""
